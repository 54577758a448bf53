"""Remote refs and the HTTP client: ref parsing, RemotePool against recorded upstream
responses (a replay server) and against our own server, and pls poke/peek/get/pool info/
pool list with http(s):// refs.  Only loopback addresses are used.
"""

import http.server
import json
import os
import socket
import threading
import time

import pytest

from test_server import (HAS_OPENSSL, error_of, fixture_names,
                         jsonl, lite3_frames, make_certificate, parse_head, read_fixture, run_pls,
                         seed_demo)

# Fixtures shared with test_server (pytest finds fixtures imported into a module).
from test_server import _built_pyz, draft, plasmite, pool_dir, start_server  # noqa: F401

# -- ref parsing ------------------------------------------------------------------------

ACCEPTED = {
    "http://h:9700/demo": ("http://h:9700/", "demo"),
    "https://h/demo": ("https://h/", "demo"),
    "http://[::1]:9700/demo": ("http://[::1]:9700/", "demo"),
    "http://127.0.0.1:80/demo": ("http://127.0.0.1/", "demo"),
    "http://H.example:9700/./demo": ("http://h.example:9700/", "demo"),
    "http://h/a/../demo": ("http://h/", "demo"),
    "http://h/my%20pool": ("http://h/", "my pool"),
    "http://user:pw@h:1/demo": ("http://h:1/", "demo"),
}
REJECTED = {
    "HTTP://h/demo": ("remote pool ref must use http or https scheme",
                      "Use shorthand: http(s)://host:port/<pool>."),
    "tcp://h/demo": ("remote pool ref must use http or https scheme", None),
    "ftp://h/demo": ("remote pool ref must use http or https scheme", None),
    "http://[::1/demo": ("invalid remote pool ref", "Use shorthand: http(s)://host:port/<pool>."),
    "http://h:99999/demo": ("invalid remote pool ref", None),
    "http://h:x/demo": ("invalid remote pool ref", None),
    "http:///demo": ("remote pool ref must use shorthand http(s)://host:port/<pool>", None),
    "http://h/demo?x=1": ("remote pool ref must not include query or fragment",
                          "Use shorthand: http(s)://host:port/<pool>."),
    "http://h/demo#frag": ("remote pool ref must not include query or fragment", None),
    "http://h/demo?": ("remote pool ref must not include query or fragment", None),
    "http://h/a%2Fb": ("remote pool name must not contain path separators",
                       "Use a single pool segment: http(s)://host:port/<pool>."),
    "http://h/a%2fb": ("remote pool name must not contain path separators", None),
    "http://h:9700": ("remote pool ref must use shorthand http(s)://host:port/<pool>",
                      "API-shaped URLs are not accepted as pool refs."),
    "http://h:9700/": ("remote pool ref must use shorthand http(s)://host:port/<pool>", None),
    "http://h:9700/demo/": ("remote pool ref must use shorthand http(s)://host:port/<pool>", None),
    "http://h/v0/pools/demo/append": ("remote pool ref must use shorthand http(s)://host:port/<pool>",
                                      None),
    "http://h/pools/demo": ("remote pool ref must use shorthand http(s)://host:port/<pool>", None),
    "http://h/pool": ("remote pool ref must use shorthand http(s)://host:port/<pool>", None),
}


def test_parse_remote_ref_accepts_shorthand():
    for text, expected in ACCEPTED.items():
        if expected is not None:
            assert draft.parse_remote_ref(text) == expected, text
    for local in ("demo", "./x.plasmite", "/abs/x", "dir/x", "a.plasmite"):
        assert draft.parse_remote_ref(local) is None


def test_parse_remote_ref_rejections():
    for text, (message, hint) in REJECTED.items():
        with pytest.raises(plasmite.PlasmiteError) as raised:
            draft.parse_remote_ref(text)
        assert raised.value.kind == "Usage", text
        assert raised.value.message == message, text
        if hint is not None:
            assert raised.value.hint == hint, text
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.parse_remote_ref("http://[::1/demo")
    assert raised.value.causes == ["invalid IPv6 address"]


def test_parse_server_url():
    assert draft.parse_server_url("http://127.0.0.1:9700") == "http://127.0.0.1:9700/"
    assert draft.parse_server_url("https://h/") == "https://h/"
    for text in ("http://h/demo", "http://h/?x", "ftp://h", "pools"):
        with pytest.raises(plasmite.PlasmiteError):
            draft.parse_server_url(text)


def test_status_error_mapping():
    envelope = b'{"error":{"kind":"Corrupt","message":"bad magic","path":"/p","seq":3,"offset":8}}'
    error = draft.remote_status_error(500, envelope)
    assert (error.kind, error.message, error.path, error.seq, error.offset) == (
        "Corrupt", "bad magic", "/p", 3, 8)
    assert draft.remote_status_error(500, b'{"error":{"kind":"Weird","message":"m"}}').kind == "Internal"
    for status, kind in ((400, "Usage"), (413, "Usage"), (401, "Permission"), (403, "Permission"),
                         (404, "NotFound"), (409, "AlreadyExists"), (423, "Busy"), (500, "Internal"),
                         (503, "Internal"), (415, "Io"), (422, "Io"), (302, "Io")):
        error = draft.remote_status_error(status, b"text")
        assert (error.kind, error.message) == (kind, "remote error status %d" % status)


# -- a server replaying upstream's recorded responses ------------------------------------

def load_exchanges():
    exchanges = []
    for name in fixture_names():
        request_line, _headers = parse_head(read_fixture(name, "request_headers"))
        method, target, _version = request_line.split()
        status_line, headers = parse_head(read_fixture(name, "response_headers"))
        exchanges.append({
            "name": name, "method": method, "target": target,
            "body": read_fixture(name, "request_body"),
            "status": int(status_line.split()[1]),
            "headers": [(key, value) for key, value in headers.items()
                        if key not in ("date", "content-length", "transfer-encoding")],
            "is_chunked": headers.get("transfer-encoding") == "chunked",
            "response": read_fixture(name, "response_body") or b""})
    return exchanges


def body_matches(expected, sent):
    """A recorded body matches when every recorded JSON field was sent alike (or bytes agree)."""
    if expected is None:
        return True
    if expected == sent:
        return True
    try:
        recorded, actual = json.loads(expected), json.loads(sent)
    except ValueError:
        return False
    return isinstance(recorded, dict) and isinstance(actual, dict) and all(
        actual.get(key) == value for key, value in recorded.items())


class ReplayServer:
    """http.server on 127.0.0.1 answering with upstream's recorded responses.

    ``extra`` adds exchanges checked first: {(method, target): (status, headers, body, mode)}
    with mode None, "chunked" or "abort" (headers, one chunk, then hang up).
    """

    def __init__(self, extra=None):
        self.exchanges = load_exchanges()
        self.extra = dict(extra or {})
        self.requests = []
        replay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                replay.requests.append((self.command, self.path, dict(self.headers), body))
                special = replay.extra.get((self.command, self.path))
                if special is not None:
                    status, headers, payload, mode = special
                    return self.send(status, headers, payload, mode)
                for exchange in replay.exchanges:
                    if (exchange["method"], exchange["target"]) == (self.command, self.path) and \
                            body_matches(exchange["body"], body):
                        mode = "chunked" if exchange["is_chunked"] else None
                        return self.send(exchange["status"], exchange["headers"],
                                         exchange["response"], mode)
                self.send(404, [], b"", None)

            def send(self, status, headers, payload, mode):
                self.send_response_only(status)
                for name, value in headers:
                    self.send_header(name, value)
                if mode is None:
                    self.send_header("content-length", str(len(payload)))
                else:
                    self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                if mode is None:
                    self.wfile.write(payload)
                    return
                chunks = payload.splitlines(keepends=True) if b"\n" in payload else [payload]
                for chunk in chunks if mode == "chunked" else chunks[:1]:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if mode == "abort":
                    self.close_connection = True
                    return
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_DELETE = answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replay():
    servers = []

    def start(extra=None):
        server = ReplayServer(extra)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def recorded_json(name):
    return json.loads(read_fixture(name, "response_body"))


def test_client_against_upstream_responses(replay):
    server = replay()
    pool = draft.RemotePool.open(server.base_url, "demo", token="", ca_file="")
    with pool:
        assert pool.opened_info == recorded_json("04_open_pool")["pool"]
        assert pool.info() == recorded_json("02_pool_info")["pool"]
        assert pool.get(2) == recorded_json("08_get_seq")["message"]
        assert pool.get_lite3(1) == read_fixture("10_get_lite3", "response_body")
        appended = pool.append({"kind": "note", "x": 1.5}, ["note"])
        assert appended == recorded_json("05_append")["message"]
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.append([1, 2], [])
        assert (raised.value.kind, raised.value.message) == ("Usage", "data must be object")
        assert raised.value.path == "demo"
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.get(999)
        error = raised.value
        assert (error.kind, error.message, error.seq, error.path) == (
            "NotFound", "message not found", 999, "demo")
        messages = list(pool.tail(since_seq=1, max_messages=10, timeout_ms=500))
        assert messages == jsonl(read_fixture("11_tail_jsonl", "response_body"))
        assert list(pool.tail(since_seq=2, max_messages=1, timeout_ms=500)) == \
            jsonl(read_fixture("12_tail_jsonl_max1", "response_body"))
        frames = list(pool.tail_lite3(since_seq=1, max_messages=3, timeout_ms=300))
        assert [(frame.seq, frame.payload) for frame in frames] == \
            lite3_frames(read_fixture("13_tail_lite3", "response_body"))
        assert frames[0].timestamp_ns > 0
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.tail(since_seq=1, timeout_ms=999999)
        assert (raised.value.kind, raised.value.message) == ("Usage", "tail timeout exceeds server limit")
        missing = draft.RemotePool(pool.client, "nope")
        with pytest.raises(plasmite.PlasmiteError) as raised:
            missing.info()
        assert (raised.value.kind, raised.value.message, raised.value.path) == (
            "NotFound", "not found", "nope")
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.client.fetch("POST", "/v0/pools/demo/append", b'{"data":')
        assert (raised.value.kind, raised.value.message) == ("Usage", "remote error status 400")
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.client.fetch("GET", "/v1/pools")
        assert (raised.value.kind, raised.value.message) == ("NotFound", "remote error status 404")
        pool.client.delete_pool("created")
    assert draft.list_remote_pools(server.base_url, token="") == recorded_json("01_list_pools")["pools"]
    method, target, headers, body = server.requests[0]
    assert (method, target, body) == ("POST", "/v0/pools/open", b'{"pool":"demo"}')
    assert headers["Accept"] == "application/json" and headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers


def test_client_broken_responses(replay):
    messages = read_fixture("11_tail_jsonl", "response_body")
    server = replay({
        ("GET", "/v0/pools/demo/tail?since_seq=1"): (200, [("content-type", "application/jsonl")],
                                                      messages, "abort"),
        ("GET", "/v0/pools/demo/tail?since_seq=2"): (200, [("content-type", "application/jsonl")],
                                                      b"{not json\n", "chunked"),
        ("GET", "/v0/pools/demo/tail_lite3?since_seq=1"): (
            200, [], read_fixture("13_tail_lite3", "response_body")[:30], "chunked"),
        ("GET", "/v0/pools/demo/info"): (200, [("content-type", "application/json")], b"[", None),
        ("GET", "/v0/pools/demo/messages/1"): (
            500, [("content-type", "application/json")],
            b'{"error":{"kind":"Io","message":"error","path":"/srv/p"}}', None),
        ("POST", "/v0/pools/demo/append"): (423, [], b"busy", None),
    })
    pool = draft.RemotePool(draft.RemoteClient(server.base_url, token="", ca_file=""), "demo")
    stream = pool.tail(since_seq=1)
    assert next(stream)["seq"] == 1
    with pytest.raises(plasmite.PlasmiteError) as raised:
        list(stream)
    assert (raised.value.kind, raised.value.message) == ("Io", "failed to read tail stream")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        list(pool.tail(since_seq=2))
    assert (raised.value.kind, raised.value.message) == ("Internal", "invalid tail message json")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        list(pool.tail_lite3(since_seq=1))
    assert raised.value.message == "failed to read tail stream"
    with pytest.raises(plasmite.PlasmiteError) as raised:
        pool.info()
    assert (raised.value.kind, raised.value.message) == ("Internal", "invalid response json")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        pool.get(1)
    assert (raised.value.kind, raised.value.message, raised.value.path, raised.value.seq) == (
        "Io", "error", "demo", 1)
    with pytest.raises(plasmite.PlasmiteError) as raised:
        pool.append({"x": 1})
    assert (raised.value.kind, raised.value.message) == ("Busy", "remote error status 423")


def test_transport_failures():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.list_remote_pools("http://127.0.0.1:%d/" % port, token="")
    error = raised.value
    assert (error.kind, error.message) == ("Io", "request failed")
    assert error.causes[0].startswith("http://127.0.0.1:%d/v0/pools: Connection Failed: Connect "
                                      "error: Connection refused" % port)
    assert error.causes[1].startswith("Connection refused")


# -- the client against our server -------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch):
    for name in ("PLASMITE_TOKEN", "PLASMITE_TOKEN_FILE", "PLASMITE_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_client_round_trips(start_server, clean_environment):
    server = start_server()
    with draft.RemoteClient(server.base_url) as client:
        info = client.create_pool("demo", 65536)
        assert info["name"] == "demo" and info["file_size"] == 65536
        with pytest.raises(plasmite.PlasmiteError) as raised:
            client.create_pool("demo")
        assert (raised.value.kind, raised.value.path) == ("AlreadyExists", "demo")
        pool = client.open_pool("demo")
        first = pool.append({"x": 1}, ["a"], "flush")
        assert first["seq"] == 1 and first["meta"]["tags"] == ["a"]
        payload = pool.get_lite3(1)
        again = pool.append_lite3(payload)
        assert again["seq"] == 2 and again["data"] == {"x": 1}
        assert pool.get_lite3(2) == payload
        frames = list(pool.tail_lite3(since_seq=2, max_messages=1, timeout_ms=500))
        assert [(frame.seq, frame.payload) for frame in frames] == [(2, payload)]
        socket_before = client._connection.sock
        assert [message["seq"] for message in pool.tail(since_seq=1, max_messages=2,
                                                        timeout_ms=500)] == [1, 2]
        assert pool.info()["bounds"] == {"newest": 2, "oldest": 1}
        assert client._connection.sock is socket_before  # kept alive across requests
        stream = pool.tail(since_seq=1, timeout_ms=5000)
        assert next(stream)["seq"] == 1
        stream.close()  # leaving a stream early costs its connection, nothing else
        assert pool.get(2)["data"] == {"x": 1}
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.append_lite3(b"\x01")
        assert raised.value.kind == "Corrupt"
        assert [entry["name"] for entry in client.list_pools()] == ["demo"]
        client.delete_pool("demo")
        with pytest.raises(plasmite.PlasmiteError) as raised:
            client.open_pool("demo")
        assert (raised.value.kind, raised.value.path) == ("NotFound", "demo")


def test_client_sees_an_aborted_stream(start_server, pool_dir, clean_environment):
    with plasmite.LocalPool.create(str(pool_dir / "mixed.plasmite"), 65536) as pool:
        pool.append(plasmite.encode_message([], {"n": 1}))
        pool.append(b"\x01")
    server = start_server()
    with draft.RemotePool.open(server.base_url, "mixed") as pool:
        stream = pool.tail(since_seq=1, timeout_ms=2000)
        assert next(stream)["data"] == {"n": 1}
        with pytest.raises(plasmite.PlasmiteError) as raised:
            next(stream)
        assert (raised.value.kind, raised.value.message) == ("Io", "failed to read tail stream")
        assert pool.get(1)["seq"] == 1  # the client recovers on a new connection


def test_client_resends_on_a_connection_the_server_closed(start_server, pool_dir,
                                                          clean_environment):
    seed_demo(pool_dir)
    server = start_server(timeouts={"idle_timeout": 0.2})
    with draft.RemoteClient(server.base_url) as client:
        pool = client.open_pool("demo")
        time.sleep(0.6)  # the server closes the idle connection
        assert pool.append({"n": 3})["seq"] == 3
        assert pool.info()["bounds"]["newest"] == 3  # appended once, not twice


def test_client_token_from_environment(start_server, pool_dir, tmp_path, clean_environment):
    seed_demo(pool_dir)
    server = start_server(token="secret")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(server.base_url, "demo")
    assert (raised.value.kind, raised.value.message, raised.value.path) == (
        "Permission", "missing bearer token", "demo")
    clean_environment.setenv("PLASMITE_TOKEN", "wrong")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(server.base_url, "demo")
    assert raised.value.message == "invalid bearer token"
    clean_environment.setenv("PLASMITE_TOKEN", "secret")
    with draft.RemotePool.open(server.base_url, "demo") as pool:
        assert pool.get(1)["data"] == {"n": 1}
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    clean_environment.setenv("PLASMITE_TOKEN_FILE", str(token_file))
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(server.base_url, "demo")
    assert raised.value.kind == "Usage"  # both variables set
    clean_environment.delenv("PLASMITE_TOKEN")
    with draft.RemotePool.open(server.base_url, "demo") as pool:
        assert pool.info()["name"] == "demo"
    token_file.write_text("  \n")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(server.base_url, "demo")
    assert (raised.value.kind, raised.value.message) == ("Usage", "token file is empty")
    clean_environment.setenv("PLASMITE_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(server.base_url, "demo")
    assert (raised.value.kind, raised.value.message) == ("Io", "failed to read token file")


def test_client_access_modes(start_server, pool_dir, tmp_path, clean_environment):
    seed_demo(pool_dir)
    write_only = start_server(access="write-only")
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(write_only.base_url, "demo")
    assert raised.value.kind == "Permission" and raised.value.message.startswith("forbidden:")
    other = tmp_path / "other"
    other.mkdir()
    seed_demo(other)
    read_only = start_server(other, access="read-only")
    with draft.RemotePool.open(read_only.base_url, "demo") as pool:
        assert pool.get(2)["seq"] == 2
        with pytest.raises(plasmite.PlasmiteError) as raised:
            pool.append({"x": 1})
        assert raised.value.kind == "Permission"


@pytest.mark.skipif(not HAS_OPENSSL, reason="openssl is not installed")
def test_client_tls_with_ca_file(start_server, pool_dir, tmp_path, clean_environment):
    seed_demo(pool_dir)
    cert, key = make_certificate(tmp_path)
    server = start_server(tls_cert=cert, tls_key=key)
    url = "https://127.0.0.1:%d/" % server.port
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.RemotePool.open(url, "demo")
    assert (raised.value.kind, raised.value.message) == ("Io", "request failed")
    assert "PLASMITE_CA_FILE" in raised.value.hint
    clean_environment.setenv("PLASMITE_CA_FILE", cert)
    with draft.RemotePool.open(url, "demo") as pool:
        assert [message["seq"] for message in pool.tail(since_seq=1, max_messages=2,
                                                        timeout_ms=1000)] == [1, 2]
    localhost = "https://localhost:%d/" % server.port
    with draft.RemotePool.open(localhost, "demo") as pool:
        assert pool.get(1)["seq"] == 1


# -- the command line with remote refs --------------------------------------------------

def pls_env(**extra):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("PLASMITE_")}
    environment.update(extra)
    return environment


def pls_json(*args, **kwargs):
    result = run_pls(*args, env=kwargs.pop("env", pls_env()), **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_against_upstream_responses(replay):
    messages = jsonl(read_fixture("11_tail_jsonl", "response_body"))
    server = replay({
        ("GET", "/v0/pools/demo/tail?since_seq=3&timeout_ms=300"): (
            200, [("content-type", "application/jsonl")],
            json.dumps(messages[2]).encode() + b"\n", "chunked"),
        ("GET", "/v0/pools/demo/tail?since_seq=4&timeout_ms=300"): (
            200, [("content-type", "application/jsonl")], b"", "chunked"),
    })
    ref = server.base_url + "demo"
    poked = pls_json("poke", ref, '{"kind":"note","x":1.5}', "--tag", "note")
    assert poked == recorded_json("05_append")["message"]
    assert pls_json("get", ref, "2") == recorded_json("08_get_seq")["message"]
    info = pls_json("pool", "info", ref, "--json")
    assert info["bounds"] == {"newest": 2, "oldest": 1} and info["name"] == ref
    assert pls_json("pool", "list", server.base_url)["pools"] == recorded_json("01_list_pools")["pools"]
    # Peek starts after the newest message the open reported (2), prints 3, then a quiet
    # cycle ends it with 124.
    result = run_pls("peek", ref, "--jsonl", "--timeout", "300ms", env=pls_env())
    assert result.returncode == 124, result.stderr
    assert jsonl(result.stdout) == [messages[2]]
    targets = [target for _method, target, _headers, _body in server.requests]
    assert targets[-2:] == ["/v0/pools/demo/tail?since_seq=3&timeout_ms=300",
                            "/v0/pools/demo/tail?since_seq=4&timeout_ms=300"]
    result = run_pls("get", ref, "999", env=pls_env())
    assert result.returncode == 3
    error = error_of(result)
    assert error["seq"] == 999 and "pool info" in error["hint"] and "path" not in error


def test_cli_retry_busy(replay):
    server = replay({("POST", "/v0/pools/demo/append"): (
        423, [("content-type", "application/json")],
        b'{"error":{"kind":"Busy","message":"pool is busy"}}', None)})
    result = run_pls("poke", server.base_url + "demo", "{}", "--retry", "2", "--retry-delay", "10ms",
                     env=pls_env())
    assert result.returncode == 5
    error = error_of(result)
    assert error["kind"] == "Busy" and "Retry attempts: 3" in error["hint"]
    appends = [entry for entry in server.requests if entry[1] == "/v0/pools/demo/append"]
    assert len(appends) == 3


def test_cli_remote_poke(start_server, pool_dir):
    seed_demo(pool_dir, name="demo")
    server = start_server()
    ref = server.base_url + "demo"
    message = pls_json("poke", ref, '{"x":1}', "--tag", "ping")
    assert message["seq"] == 3 and message["data"] == {"x": 1} and message["meta"]["tags"] == ["ping"]
    for bad_ref, fragment in ((server.base_url + "v0/pools/demo/append", "shorthand"),
                              (ref + "/", "shorthand"), ("HTTP://127.0.0.1:1/demo", "scheme")):
        result = run_pls("poke", bad_ref, "{}", env=pls_env())
        assert result.returncode == 2 and fragment in error_of(result)["message"]
    result = run_pls("poke", ref, "{}", "--create", env=pls_env())
    assert result.returncode == 2 and "does not support --create" in error_of(result)["message"]
    result = run_pls("poke", server.base_url + "missing", "{}", env=pls_env())
    assert result.returncode == 3
    assert error_of(result)["hint"].startswith("Pool path not found.")
    result = run_pls("poke", ref, "[1]", env=pls_env())
    assert result.returncode == 2 and error_of(result)["message"] == "data must be object"
    streamed = run_pls("poke", ref, "--tag", "s", input=b'{"a":1}\n{"a":2}\n', env=pls_env())
    assert streamed.returncode == 0, streamed.stderr
    assert [line["data"]["a"] for line in jsonl(streamed.stdout)] == [1, 2]
    skipped = run_pls("poke", ref, "-i", "jsonl", "-e", "skip", input=b'{"a":3}\nnot-json\n',
                      env=pls_env())
    assert skipped.returncode == 1 and len(jsonl(skipped.stdout)) == 1
    notices = [json.loads(line)["notice"] for line in skipped.stderr.decode().splitlines()]
    assert notices[0]["kind"] == "ingest_skip"
    assert notices[0]["details"]["pool_path"] == "http://127.0.0.1:%d//demo" % server.port
    flushed = pls_json("poke", ref, '{"f":1}', "--durability", "flush")
    assert flushed["data"] == {"f": 1}


def test_cli_remote_poke_auth_and_access(start_server, pool_dir, tmp_path):
    seed_demo(pool_dir)
    server = start_server(token="secret")
    ref = server.base_url + "demo"
    result = run_pls("poke", ref, "{}", env=pls_env())
    assert result.returncode == 6 and error_of(result)["kind"] == "Permission"
    assert pls_json("poke", ref, '{"t":1}', env=pls_env(PLASMITE_TOKEN="secret"))["seq"] == 3
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    assert pls_json("poke", ref, '{"t":2}', env=pls_env(PLASMITE_TOKEN_FILE=str(token_file)))["seq"] == 4
    write_only_dir = tmp_path / "write-only"
    write_only_dir.mkdir()
    seed_demo(write_only_dir)
    write_only = start_server(write_only_dir, access="write-only")
    result = run_pls("poke", write_only.base_url + "demo", "{}", env=pls_env())
    assert result.returncode == 6  # the open is a read
    read_only_dir = tmp_path / "read-only"
    read_only_dir.mkdir()
    seed_demo(read_only_dir)
    read_only = start_server(read_only_dir, access="read-only")
    result = run_pls("poke", read_only.base_url + "demo", "{}", env=pls_env())
    assert result.returncode == 6 and "forbidden" in error_of(result)["message"]


def test_cli_remote_peek(start_server, pool_dir):
    server = start_server()
    with draft.RemoteClient(server.base_url, token="") as client:
        client.create_pool("demo")
        client.create_pool("empty")
    ref = server.base_url + "demo"
    pls_json("poke", ref, '{"x":1}', "--tag", "drop")
    pls_json("poke", ref, '{"x":2}', "--tag", "keep")
    result = run_pls("peek", ref, "--tail", "1", "--one", "--jsonl", "--timeout", "2s", env=pls_env())
    assert result.returncode == 0 and jsonl(result.stdout)[0]["seq"] == 2
    result = run_pls("peek", ref, "--tail", "10", "--jsonl", "--tag", "keep", "--timeout", "300ms",
                     env=pls_env())
    assert result.returncode == 124
    assert [message["data"] for message in jsonl(result.stdout)] == [{"x": 2}]
    result = run_pls("peek", ref, "--tail", "2", "--jsonl", "--data-only", "--timeout", "200ms",
                     env=pls_env())
    assert result.stdout == b'{"x":1}\n{"x":2}\n'
    for arguments, fragment in ((["--since", "5m"], "does not support --since"),
                                (["--tail", "5", "--replay", "1"], "does not support --replay"),
                                (["--no-notify"], "does not support --no-notify"),
                                (["--quiet-drops"], "does not support --quiet-drops")):
        result = run_pls("peek", ref, *arguments, env=pls_env())
        assert result.returncode == 2 and fragment in error_of(result)["message"]
    result = run_pls("peek", server.base_url + "v0/pools/demo/tail", env=pls_env())
    assert result.returncode == 2
    started = time.monotonic()
    result = run_pls("peek", server.base_url + "empty", "--jsonl", "--timeout", "150ms", env=pls_env())
    assert result.returncode == 124 and result.stdout == b"" and result.stderr == b""
    assert time.monotonic() - started < 10
    result = run_pls("peek", ref, "--jsonl", "--timeout", "60s", env=pls_env())
    assert result.returncode == 2
    assert error_of(result)["message"] == "tail timeout exceeds server limit"
    result = run_pls("peek", server.base_url + "missing", "--jsonl", env=pls_env())
    assert result.returncode == 3


def run_later(delay, function, *args):
    timer = threading.Timer(delay, function, args)
    timer.start()
    return timer


def test_cli_remote_peek_follows_new_messages(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    ref = server.base_url + "demo"
    with draft.RemoteClient(server.base_url, token="") as client:
        pool = client.open_pool("demo")
        # Without --tail only new messages show, like a local peek (upstream replays history).
        timer = run_later(0.8, pool.append, {"new": 1})
        result = run_pls("peek", ref, "--jsonl", "--one", "--timeout", "10s", env=pls_env())
        timer.join()
        assert result.returncode == 0, result.stderr
        assert [message["data"] for message in jsonl(result.stdout)] == [{"new": 1}]
    with draft.RemoteClient(server.base_url, token="") as client:
        client.create_pool("fresh")
        pool = client.open_pool("fresh")
        timers = [run_later(0.8, pool.append, {"x": 1}), run_later(1.0, pool.append, {"x": 2})]
        result = run_pls("peek", server.base_url + "fresh", "--tail", "2", "--jsonl", "--one",
                         "--timeout", "10s", env=pls_env())
        for timer in timers:
            timer.join()
        assert result.returncode == 0, result.stderr
        assert [message["data"] for message in jsonl(result.stdout)] == [{"x": 2}]


def test_remote_peek_where_predicate(start_server, pool_dir, capsys, clean_environment):
    seed_demo(pool_dir)
    server = start_server()
    parser = plasmite.build_parser()
    args = parser.parse_args(["peek", server.base_url + "demo", "--tail", "5", "--jsonl",
                              "--timeout", "200ms"])
    args.output = plasmite.Output("never")
    status = draft.remote_peek(args, server.base_url, "demo",
                               lambda message: message["data"]["n"] > 1)
    assert status == 124
    assert [message["data"]["n"] for message in jsonl(capsys.readouterr().out.encode())] == [2]


def test_cli_remote_get_info_list(start_server, pool_dir):
    seed_demo(pool_dir)
    seed_demo(pool_dir, name="alpha")
    server = start_server()
    ref = server.base_url + "demo"
    assert pls_json("get", ref, "1")["data"] == {"n": 1}
    result = run_pls("get", ref, "999", env=pls_env())
    assert result.returncode == 3 and error_of(result)["seq"] == 999
    result = run_pls("get", server.base_url + "nope", "1", env=pls_env())
    assert result.returncode == 3 and error_of(result)["hint"].startswith("Pool path not found")
    info = pls_json("pool", "info", ref, "--json")
    assert info["name"] == ref and info["path"] == str(pool_dir / "demo.plasmite")
    assert info["bounds"] == {"newest": 2, "oldest": 1}
    listed = pls_json("pool", "list", "http://127.0.0.1:%d" % server.port)["pools"]
    assert [entry["name"] for entry in listed] == ["alpha", "demo"]


@pytest.mark.skipif(not HAS_OPENSSL, reason="openssl is not installed")
def test_cli_remote_tls(start_server, pool_dir, tmp_path):
    seed_demo(pool_dir)
    cert, key = make_certificate(tmp_path)
    server = start_server(tls_cert=cert, tls_key=key)
    ref = "https://127.0.0.1:%d/demo" % server.port
    result = run_pls("poke", ref, "{}", env=pls_env())
    assert result.returncode == 8 and error_of(result)["message"] == "request failed"
    message = pls_json("poke", ref, '{"tls":true}', env=pls_env(PLASMITE_CA_FILE=cert))
    assert message["data"] == {"tls": True}
