"""pls serve: HTTP protocol v0, auth, access modes, limits, TLS, serve check/init (remote.md).

Servers run in-process (run_server in a thread, port 0 on 127.0.0.1) or, for the
command line, as real pls.pyz processes.  Only loopback addresses are used.
"""

import http.client
import json
import os
import pty
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

import plasmite
from conftest import FIXTURES

# The tests were written against section 10 as "draft"; it is plasmite itself now.
draft = plasmite
FIXTURES_HTTP = os.path.join(FIXTURES, "http")
HAS_OPENSSL = shutil.which("openssl") is not None
HAS_CURL = shutil.which("curl") is not None
PYZ = []  # the session's built pls.pyz, set by the fixture below


@pytest.fixture(autouse=True)
def _built_pyz(pyz_path):
    if not PYZ:
        PYZ.append(pyz_path)


def pls_command(*args):
    """The command line of the built pls.pyz."""
    return [sys.executable, PYZ[0]] + [str(arg) for arg in args]


def run_pls(*args, input=None, env=None, timeout=30):
    return subprocess.run(pls_command(*args), input=input, capture_output=True, env=env,
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def error_of(result):
    """The JSON error envelope a failed pls printed on (non-terminal) stderr."""
    return json.loads(result.stderr.decode().strip().splitlines()[-1])["error"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(port, timeout=10, context=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if context is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            else:
                connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2,
                                                         context=context)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not come up")


# -- in-process servers -------------------------------------------------------------

class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def error(self):
        return self.json()["error"]


class RunningServer:
    """run_server() on 127.0.0.1, port 0, in a thread; stop() ends it."""

    def __init__(self, directory, timeouts=None, **options):
        self.directory = str(directory)
        self.config = draft.ServeConfig(self.directory, "127.0.0.1:0", **options)
        for name, value in (timeouts or {}).items():
            setattr(self.config, name, value)
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.address = None
        self.error = None
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(15)
        if self.error is not None:
            raise self.error

    def _run(self):
        def on_listening(address):
            self.address = address
            self.ready.set()
        try:
            self.result = draft.run_server(self.config, self.stop_event, on_listening)
        except BaseException as error:  # reported to the test thread
            self.error = error
            self.ready.set()

    @property
    def port(self):
        return self.address[1]

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/" % self.port

    def connection(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, connection=None, token=None):
        own = connection is None
        connection = connection or self.connection()
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            return Response(response.status, {name.lower(): value
                                              for name, value in response.getheaders()}, payload)
        finally:
            if own:
                connection.close()

    def stop(self):
        self.stop_event.set()
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture
def pool_dir(tmp_path):
    directory = tmp_path / "pools"
    directory.mkdir()
    return directory


@pytest.fixture
def start_server(pool_dir):
    servers = []

    def start(directory=None, **options):
        server = RunningServer(directory or pool_dir, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def seed_demo(directory, size=1024 * 1024, name="demo"):
    """Create the upstream fixture's pool: [seed] {n:1}, [seed,two] {n:2,s:'héllo'}."""
    with plasmite.LocalPool.create(os.path.join(str(directory), name + ".plasmite"), size) as pool:
        pool.append(plasmite.encode_message(["seed"], {"n": 1}))
        pool.append(plasmite.encode_message(["seed", "two"], {"n": 2, "s": "héllo"}))


def append(server, pool, data, tags=(), token=None, durability=None):
    body = {"data": data, "tags": list(tags)}
    if durability is not None:
        body["durability"] = durability
    response = server.request("POST", "/v0/pools/%s/append" % pool, body, token=token)
    assert response.status == 200, response.body
    return response.json()["message"]


def jsonl(body):
    return [json.loads(line) for line in body.decode().splitlines()]


# -- routes ---------------------------------------------------------------------------

def test_healthz_and_version_header(start_server):
    server = start_server()
    response = server.request("GET", "/healthz")
    assert response.status == 200 and response.json() == {"ok": True}
    assert response.headers["plasmite-version"] == "0"
    assert response.headers["content-type"] == "application/json"
    assert "date" in response.headers


def test_keep_alive_two_requests_on_one_connection(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    connection = server.connection()
    connection.connect()
    first_socket = connection.sock
    assert server.request("GET", "/healthz", connection=connection).status == 200
    assert server.request("GET", "/v0/pools/demo/messages/1", connection=connection).status == 200
    # A finished stream leaves the connection usable too.
    assert server.request("GET", "/v0/pools/demo/tail?since_seq=1&max=1",
                          connection=connection).status == 200
    assert server.request("GET", "/v0/pools", connection=connection).status == 200
    assert connection.sock is first_socket
    connection.close()


def test_create_list_open_info_delete(start_server, pool_dir):
    server = start_server()
    created = server.request("POST", "/v0/pools", {"pool": "alpha", "size_bytes": 65536})
    assert created.status == 200
    info = created.json()["pool"]
    assert info["name"] == "alpha" and info["path"] == str(pool_dir / "alpha.plasmite")
    assert info["file_size"] == 65536 and info["index_capacity"] == 256 and info["bounds"] == {}
    default = server.request("POST", "/v0/pools", {"pool": "info"}).json()["pool"]
    assert default["file_size"] >= 1024 * 1024
    again = server.request("POST", "/v0/pools", {"pool": "alpha"})
    assert again.status == 409 and again.error["kind"] == "AlreadyExists"
    assert again.error["path"].endswith("alpha.plasmite")
    assert os.path.getsize(str(pool_dir / "alpha.plasmite")) == 65536  # not truncated
    small = server.request("POST", "/v0/pools", {"pool": "tiny", "size_bytes": 1024})
    assert small.status == 400
    assert small.error == {"kind": "Usage", "message": "file_size must exceed header and index size"}
    assert not os.path.exists(str(pool_dir / "tiny.plasmite"))
    (pool_dir / "notes.txt").write_text("not a pool")
    listed = server.request("GET", "/v0/pools").json()["pools"]
    assert [entry["name"] for entry in listed] == ["alpha", "info"]
    assert server.request("GET", "/v0/ui/pools").json() == server.request("GET", "/v0/pools").json()
    opened = server.request("POST", "/v0/pools/open", {"pool": "alpha"})
    assert opened.status == 200 and opened.json()["pool"]["name"] == "alpha"
    by_info = server.request("GET", "/v0/pools/alpha/info").json()["pool"]
    assert set(by_info) == set(opened.json()["pool"])
    assert server.request("GET", "/v0/ui/pools/alpha/info").status == 200
    assert server.request("DELETE", "/v0/pools/info").json() == {"ok": True}
    assert [entry["name"] for entry in server.request("GET", "/v0/pools").json()["pools"]] == ["alpha"]
    missing = server.request("DELETE", "/v0/pools/info")
    assert missing.status == 404
    assert missing.error["message"] == "failed to delete pool"
    assert missing.error["path"].endswith("info.plasmite")


def test_open_errors(start_server, pool_dir):
    server = start_server()
    missing = server.request("POST", "/v0/pools/open", {"pool": "nope"})
    assert missing.status == 404
    assert missing.json() == {"error": {"kind": "NotFound", "message": "not found",
                                        "path": str(pool_dir / "nope.plasmite")}}
    assert list(missing.json()["error"]) == ["kind", "message", "path"]  # envelope order
    (pool_dir / "bad.plasmite").write_bytes(b"NOPE")
    corrupt = server.request("GET", "/v0/pools/bad/info")
    assert corrupt.status == 500 and corrupt.error["kind"] == "Corrupt"
    listing = server.request("GET", "/v0/pools")
    assert listing.status == 500 and listing.error["kind"] == "Corrupt"


def test_missing_pool_directory(start_server, tmp_path):
    server = start_server(tmp_path / "absent")
    listing = server.request("GET", "/v0/pools")
    assert listing.status == 404
    assert listing.error["message"] == "failed to read pool directory"
    created = server.request("POST", "/v0/pools", {"pool": "demo"})
    assert created.status == 500
    assert created.error["kind"] == "Io" and created.error["message"] == "error"
    assert not os.path.exists(str(tmp_path / "absent"))  # serve never creates it


def test_append_and_get(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    message = append(server, "demo", {"kind": "note", "x": 1.5}, ["note"])
    assert message["seq"] == 3 and message["data"] == {"kind": "note", "x": 1.5}
    assert message["meta"] == {"tags": ["note"]} and message["time"].endswith("Z")
    flushed = append(server, "demo", {"b": 2, "a": 1}, durability="flush")
    assert flushed["seq"] == 4
    assert server.request("GET", "/v0/pools/demo/messages/4").body == \
        b'{"message":{"data":{"a":1,"b":2},"meta":{"tags":[]},"seq":4,"time":"%s"}}' % \
        flushed["time"].encode()
    null_tags = server.request("POST", "/v0/pools/demo/append",
                               {"data": {"x": 1}, "tags": None, "durability": "whatever"})
    assert null_tags.status == 200 and null_tags.json()["message"]["meta"]["tags"] == []
    got = server.request("GET", "/v0/pools/demo/messages/2").json()["message"]
    assert got["data"] == {"n": 2, "s": "héllo"} and got["meta"]["tags"] == ["seed", "two"]
    missing = server.request("GET", "/v0/pools/demo/messages/999")
    assert missing.status == 404
    assert missing.json() == {"error": {"kind": "NotFound", "message": "message not found",
                                        "seq": 999}}
    assert server.request("GET", "/v0/pools/demo/messages/0").status == 404
    not_object = server.request("POST", "/v0/pools/demo/append", {"data": [1, 2], "tags": []})
    assert not_object.status == 400
    assert not_object.json() == {"error": {"kind": "Usage", "message": "data must be object"}}
    deep = {}
    for _ in range(40):
        deep = {"a": deep}
    too_deep = server.request("POST", "/v0/pools/demo/append", {"data": deep})
    assert too_deep.status == 400 and too_deep.error["message"] == "failed to encode json as lite3"
    no_pool = server.request("POST", "/v0/pools/nope/append", {"data": {}})
    assert no_pool.status == 404 and no_pool.error["kind"] == "NotFound"


def test_append_larger_than_ring(start_server, pool_dir):
    server = start_server()
    server.request("POST", "/v0/pools", {"pool": "small", "size_bytes": 16384})
    response = server.request("POST", "/v0/pools/small/append", {"data": {"blob": "x" * 20000}})
    assert response.status == 400 and response.error["message"] == "payload exceeds ring capacity"


def test_lite3_round_trip(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    original = server.request("GET", "/v0/pools/demo/messages/2/lite3")
    assert original.status == 200
    assert original.headers["content-type"] == "application/x-plasmite-lite3"
    assert original.headers["plasmite-seq"] == "2"
    assert original.headers["plasmite-version"] == "0"
    stored = server.request("POST", "/v0/pools/demo/append_lite3", original.body,
                            {"Content-Type": "application/x-plasmite-lite3"})
    assert stored.status == 200
    message = stored.json()["message"]
    assert message["seq"] == 3 and message["data"] == {"n": 2, "s": "héllo"}
    assert message["meta"]["tags"] == ["seed", "two"]
    assert server.request("GET", "/v0/pools/demo/messages/3/lite3").body == original.body
    no_type = server.request("POST", "/v0/pools/demo/append_lite3?durability=flush", original.body)
    assert no_type.status == 200 and no_type.json()["message"]["seq"] == 4
    frames = server.request("GET", "/v0/pools/demo/tail_lite3?since_seq=3&max=1&timeout_ms=500")
    assert frames.headers["content-type"] == "application/x-plasmite-lite3-stream"
    seq, timestamp_ns, length = struct.unpack(">QQI", frames.body[:20])
    assert seq == 3 and length == len(original.body) and frames.body[20:] == original.body
    assert timestamp_ns > 0
    wrong_type = server.request("POST", "/v0/pools/demo/append_lite3", original.body,
                                {"Content-Type": "application/json"})
    assert wrong_type.status == 400
    assert wrong_type.error["message"] == "invalid content-type for lite3 append"
    empty = server.request("POST", "/v0/pools/demo/append_lite3", b"")
    assert empty.status == 400 and empty.error["message"] == "lite3 payload is required"
    invalid = server.request("POST", "/v0/pools/demo/append_lite3", b"\x01",
                             {"Content-Type": "application/x-plasmite-lite3"})
    assert invalid.status == 500 and invalid.error["kind"] == "Corrupt"
    assert invalid.error["message"] == "root is not object"


def test_corrupt_stored_payload(start_server, pool_dir):
    with plasmite.LocalPool.create(str(pool_dir / "raw.plasmite"), 65536) as pool:
        pool.append(b"\x01")
    server = start_server()
    lite3 = server.request("GET", "/v0/pools/raw/messages/1/lite3")
    assert lite3.status == 500 and lite3.error["kind"] == "Corrupt"
    tail = server.request("GET", "/v0/pools/raw/tail_lite3?since_seq=1&timeout_ms=200")
    assert tail.status == 500 and tail.error["kind"] == "Corrupt"
    message = server.request("GET", "/v0/pools/raw/messages/1")
    assert message.status == 500 and message.error["kind"] == "Corrupt"


def test_tail_jsonl(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    started = time.monotonic()
    both = server.request("GET", "/v0/pools/demo/tail?since_seq=1&max=2&timeout_ms=5000")
    assert time.monotonic() - started < 2  # ended by max, not by the timeout
    assert both.headers["content-type"] == "application/jsonl"
    assert both.headers["transfer-encoding"] == "chunked"
    assert [message["seq"] for message in jsonl(both.body)] == [1, 2]
    one = server.request("GET", "/v0/pools/demo/tail?since_seq=2&max=1&timeout_ms=500")
    assert [message["data"] for message in jsonl(one.body)] == [{"n": 2, "s": "héllo"}]
    started = time.monotonic()
    none = server.request("GET", "/v0/pools/demo/tail?since_seq=9999&timeout_ms=300")
    elapsed = time.monotonic() - started
    assert none.status == 200 and none.body == b"" and 0.25 < elapsed < 2  # ended by timeout
    assert server.request("GET", "/v0/pools/demo/tail?max=0").body == b""
    everything = server.request("GET", "/v0/pools/demo/tail?timeout_ms=200")
    assert [message["seq"] for message in jsonl(everything.body)] == [1, 2]
    append(server, "demo", {"n": 3}, ["keep", "prod"])
    append(server, "demo", {"n": 4}, ["keep,prod"])
    after = server.request("GET", "/v0/pools/demo/tail?since_seq=3&max=1&timeout_ms=500")
    assert jsonl(after.body)[0]["data"] == {"n": 3}
    kept = server.request("GET", "/v0/pools/demo/tail?tag=keep&timeout_ms=200")
    assert [message["data"]["n"] for message in jsonl(kept.body)] == [3]
    both_tags = server.request("GET", "/v0/pools/demo/tail?tag=keep&tag=%20prod%20&tag=&timeout_ms=200")
    assert [message["data"]["n"] for message in jsonl(both_tags.body)] == [3]
    comma = server.request("GET", "/v0/pools/demo/tail?tag=keep%2Cprod&timeout_ms=200")
    assert [message["data"]["n"] for message in jsonl(comma.body)] == [4]
    missing = server.request("GET", "/v0/pools/nope/tail?timeout_ms=100")
    assert missing.status == 404 and missing.error["kind"] == "NotFound"
    head = server.request("HEAD", "/v0/pools/demo/tail?timeout_ms=100")
    assert head.status == 200 and head.body == b""


def test_stream_aborts_on_a_corrupt_message(start_server, pool_dir):
    with plasmite.LocalPool.create(str(pool_dir / "mixed.plasmite"), 65536) as pool:
        pool.append(plasmite.encode_message([], {"n": 1}))
        pool.append(b"\x01")
    server = start_server()
    connection = server.connection()
    connection.request("GET", "/v0/pools/mixed/tail?since_seq=1&timeout_ms=2000")
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as raised:
        response.read()  # the first message, then the body is cut short
    assert b'"n":1' in raised.value.partial
    connection.close()
    assert server.request("GET", "/healthz").status == 200


def test_http_1_0_stream_ends_by_closing(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    client.sendall(b"GET /v0/pools/demo/tail?since_seq=1&max=2 HTTP/1.0\r\n\r\n")
    received = b""
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += chunk
    client.close()
    head, body = received.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert [message["seq"] for message in jsonl(body)] == [1, 2]


def test_live_tail_and_events(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    results = {}

    def follow(name, path):
        results[name] = server.request("GET", path)

    threads = [threading.Thread(target=follow, args=("tail", "/v0/pools/demo/tail?since_seq=3&timeout_ms=3000")),
               threading.Thread(target=follow, args=("events", "/v0/ui/pools/demo/events?since_seq=3&max=1"))]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    append(server, "demo", {"live": True}, ["live"])
    threads[1].join(5)
    assert time.monotonic() - started < 2  # the event arrived as it was appended
    threads[0].join(10)
    assert [message["data"] for message in jsonl(results["tail"].body)] == [{"live": True}]
    events = results["events"]
    assert events.headers["content-type"] == "text/event-stream"
    assert events.headers["cache-control"] == "no-cache, no-transform"
    assert events.headers["plasmite-version"] == "0"
    text = events.body.decode()
    assert text.startswith("event: message\ndata: {") and text.endswith("}\n\n")
    assert json.loads(text.split("data: ", 1)[1])["seq"] == 3


def test_ui_pages(start_server):
    server = start_server(token="secret")
    for path in ("/ui", "/ui/pools/demo"):
        page = server.request("GET", path)
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        assert b"Plasmite UI" in page.body and page.headers["plasmite-version"] == "0"
    for path in ("/ui/", "/ui/pools/a/b", "/healthz/", "/v0/pools/"):
        assert server.request("GET", path).status == 404


def test_framework_rejections(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    unknown = server.request("GET", "/v1/pools")
    assert unknown.status == 404 and unknown.body == b"" and "plasmite-version" not in unknown.headers
    for method, path, allow in (("DELETE", "/v0/pools/open", "POST"),
                                ("GET", "/v0/pools/demo", "DELETE"),
                                ("PUT", "/v0/pools", "POST,GET,HEAD"),
                                ("POST", "/v0/pools/demo/tail", "GET,HEAD"),
                                ("OPTIONS", "/healthz", "GET,HEAD")):
        response = server.request(method, path)
        assert response.status == 405 and response.headers["allow"] == allow, (method, path)
        assert "plasmite-version" not in response.headers
    json_body = '{"pool":"demo"}'
    no_type = server.request("POST", "/v0/pools/open", json_body)
    assert no_type.status == 415
    assert no_type.body == b"Expected request with `Content-Type: application/json`"
    assert no_type.headers["content-type"] == "text/plain; charset=utf-8"
    vendor = server.request("POST", "/v0/pools/open", json_body,
                            {"Content-Type": "application/vnd.plasmite+json; charset=utf-8"})
    assert vendor.status == 200
    broken = server.request("POST", "/v0/pools/demo/append", '{"data":',
                            {"Content-Type": "application/json"})
    assert broken.status == 400 and "plasmite-version" not in broken.headers
    assert broken.body.startswith(b"Failed to parse the request body as JSON: ")
    missing = server.request("POST", "/v0/pools/open", {"name": "demo"})
    assert missing.status == 422
    assert missing.body.startswith(b"Failed to deserialize the JSON body into the target type: "
                                   b".: missing field `pool`")
    wrong = server.request("POST", "/v0/pools", {"pool": 5})
    assert wrong.status == 422 and b"pool: invalid type: integer `5`" in wrong.body
    bad_tags = server.request("POST", "/v0/pools/demo/append", {"data": {}, "tags": [1]})
    assert bad_tags.status == 422 and b"tags[0]" in bad_tags.body
    bad_seq = server.request("GET", "/v0/pools/demo/messages/abc")
    assert bad_seq.status == 400 and bad_seq.body == \
        b'Invalid URL: Cannot parse value at index 1 with value `"abc"` to a `u64`'
    bad_query = server.request("GET", "/v0/pools/demo/tail?max=x")
    assert bad_query.status == 400
    assert bad_query.body == b"Failed to deserialize query string: invalid digit found in string"
    assert server.request("GET", "/v0/pools/demo/tail?timeout_ms=").status == 400
    assert server.request("GET", "/v0/pools/demo/tail?max=1&max=2").status == 400
    assert server.request("GET", "/v0/pools/demo/tail?max=1&unknown=x&timeout_ms=100").status == 200


def test_chunked_request_body(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server()
    connection = server.connection()
    connection.request("POST", "/v0/pools/demo/append", body=iter([b'{"data":', b'{"c":1}}']),
                       headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["message"]["data"] == {"c": 1}
    connection.close()


def test_pool_name_tricks(start_server, pool_dir, tmp_path):
    seed_demo(pool_dir)
    server = start_server()
    (tmp_path / "evil.plasmite").write_bytes(b"")
    for path in ("/v0/pools/a%2Fb/info", "/v0/pools/..%2Fevil/info", "/v0/pools/%2Ftmp%2Fevil/info",
                 "/v0/pools/a%2fb/tail", "/v0/pools/x%00y/info"):
        response = server.request("GET", path)
        assert response.status == 400 and response.error["kind"] == "Usage", path
    for body in ({"pool": "/tmp/evil", "size_bytes": 1024}, {"pool": "../evil"}, {"pool": ""}):
        assert server.request("POST", "/v0/pools", body).status == 400
    assert server.request("POST", "/v0/pools/open", {"pool": "/tmp/evil"}).error == {
        "kind": "Usage", "message": "pool name must not contain path separators"}
    # Dots are just characters of a name inside the pool directory.
    dots = server.request("POST", "/v0/pools", {"pool": "..", "size_bytes": 65536})
    assert dots.status == 200 and dots.json()["pool"]["path"] == str(pool_dir / "...plasmite")
    assert server.request("GET", "/v0/pools/%2e%2e/info").status == 200
    assert server.request("DELETE", "/v0/pools/..").status == 200
    assert server.request("GET", "/v0/pools/demo.plasmite/info").json()["pool"]["path"] == \
        str(pool_dir / "demo.plasmite")
    assert os.path.exists(str(tmp_path / "evil.plasmite"))


# -- auth and access ----------------------------------------------------------------

def test_bearer_token(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(token="secret")
    assert server.request("GET", "/healthz").status == 200
    assert server.request("GET", "/ui").status == 200
    missing = server.request("GET", "/v0/pools")
    assert missing.status == 401
    assert missing.json() == {"error": {"kind": "Permission", "message": "missing bearer token"}}
    for value in ("Bearer bad", "Bearer secre", "Bearer secret2", "bearer secret",
                  "Bearer  secret", "Bearer secret ", "secret", ""):
        response = server.request("GET", "/v0/pools", headers={"Authorization": value})
        assert response.status == 401, value
        assert response.error == {"kind": "Permission", "message": "invalid bearer token"}
    assert server.request("GET", "/v0/pools", token="secret").status == 200
    created = server.request("POST", "/v0/pools", {"pool": "alpha"}, token="secret")
    assert created.status == 200
    names = [os.path.basename(entry["path"])
             for entry in server.request("GET", "/v0/pools", token="secret").json()["pools"]]
    assert "alpha.plasmite" in names
    assert server.request("GET", "/v0/ui/pools/demo/events?since_seq=1&max=1").status == 401
    events = server.request("GET", "/v0/ui/pools/demo/events?since_seq=1&max=1", token="secret")
    assert events.status == 200 and events.headers["content-type"] == "text/event-stream"
    assert b"event: message" in events.body and b'"seq":1' in events.body
    # Body extraction comes before auth.
    assert server.request("POST", "/v0/pools/open", '{"pool":"demo"}').status == 415


def test_token_file(start_server, pool_dir, tmp_path):
    token_path = tmp_path / "token.txt"
    token_path.write_text("  file-token\n")
    server = start_server(token_file=str(token_path))
    assert server.request("GET", "/v0/pools", token="file-token").status == 200
    assert server.request("GET", "/v0/pools", token="  file-token").status == 401


def test_access_read_only(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(access="read-only")
    for method, path in (("GET", "/v0/pools"), ("GET", "/v0/pools/demo/info"),
                         ("GET", "/v0/pools/demo/messages/1"), ("GET", "/v0/pools/demo/messages/1/lite3"),
                         ("GET", "/v0/pools/demo/tail?max=1"), ("GET", "/v0/pools/demo/tail_lite3?max=1"),
                         ("GET", "/v0/ui/pools"), ("GET", "/v0/ui/pools/demo/info"),
                         ("GET", "/v0/ui/pools/demo/events?max=1")):
        assert server.request(method, path).status == 200, path
    assert server.request("POST", "/v0/pools/open", {"pool": "demo"}).status == 200
    for method, path, body in (("POST", "/v0/pools/demo/append", {"data": {}}),
                               ("POST", "/v0/pools", {"pool": "x"}),
                               ("DELETE", "/v0/pools/demo", None),
                               ("POST", "/v0/pools/demo/append_lite3", b"\x01")):
        response = server.request(method, path, body)
        assert response.status == 403, path
        assert response.error == {"kind": "Permission",
                                  "message": "forbidden: access mode disallows write operations"}


def test_access_write_only(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(access="write-only")
    ok = server.request("POST", "/v0/pools/demo/append",
                        {"data": {"n": 1}, "tags": [], "durability": "fast"})
    assert ok.status == 200
    for path in ("/v0/pools/demo/messages/1", "/v0/pools", "/v0/pools/demo/tail",
                 "/v0/ui/pools/demo/events"):
        response = server.request("GET", path)
        assert response.status == 403, path
        assert response.error["message"] == "forbidden: access mode disallows read operations"
    assert server.request("POST", "/v0/pools/open", {"pool": "demo"}).status == 403
    assert server.request("GET", "/healthz").status == 200 and server.request("GET", "/ui").status == 200
    assert server.request("DELETE", "/v0/pools/demo").status == 200


def test_auth_before_access(start_server):
    server = start_server(token="secret", access="read-only")
    assert server.request("POST", "/v0/pools", {"pool": "x"}).status == 401
    assert server.request("POST", "/v0/pools", {"pool": "x"}, token="secret").status == 403


# -- limits ---------------------------------------------------------------------------

def test_body_limit(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(max_body_bytes=64, token="secret")
    big = {"data": {"text": "x" * 300}, "tags": []}
    response = server.request("POST", "/v0/pools/demo/append", big)  # before auth: no token
    assert response.status == 413
    assert response.body == b"Failed to buffer the request body: length limit exceeded"
    assert "plasmite-version" not in response.headers
    huge = server.request("POST", "/v0/pools/demo/append_lite3", b"\0" * 3000000, token="secret")
    assert huge.status == 413
    small = server.request("POST", "/v0/pools/demo/append", {"data": {"n": 1}}, token="secret")
    assert small.status == 200


def test_tail_timeout_limit(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(max_tail_timeout_ms=5)
    for route in ("tail", "tail_lite3"):
        response = server.request("GET", "/v0/pools/demo/%s?timeout_ms=10" % route)
        assert response.status == 400
        assert response.json() == {"error": {"kind": "Usage",
                                             "message": "tail timeout exceeds server limit"}}
    assert server.request("GET", "/v0/ui/pools/demo/events?timeout_ms=30000").status == 400
    started = time.monotonic()
    default = server.request("GET", "/v0/pools/demo/tail?since_seq=9")  # default = the limit
    assert default.status == 200 and time.monotonic() - started < 1


def test_tail_concurrency_limit(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(max_tail_concurrency=1)
    holder = server.connection()
    holder.request("GET", "/v0/pools/demo/tail?since_seq=99&timeout_ms=1000")
    first = holder.getresponse()
    assert first.status == 200
    for route in ("tail", "tail_lite3", "../../ui/pools/demo/events"):
        busy = server.request("GET", "/v0/pools/demo/%s?timeout_ms=100" % route
                              if not route.startswith("..") else "/v0/ui/pools/demo/events")
        assert busy.status == 423
        assert busy.json() == {"error": {"kind": "Busy", "message": "too many concurrent tail requests"}}
    assert first.read() == b""  # ends at its timeout and frees the slot
    holder.close()
    assert server.request("GET", "/v0/pools/demo/tail?max=1").status == 200


def test_vanished_client_frees_its_slot(start_server, pool_dir):
    seed_demo(pool_dir)
    server = start_server(max_tail_concurrency=1)
    holder = server.connection()
    holder.request("GET", "/v0/pools/demo/tail?since_seq=99&timeout_ms=20000")
    assert holder.getresponse().status == 200
    holder.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if server.request("GET", "/v0/pools/demo/tail?max=0").status == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the slot of a closed connection was not freed")


def test_slow_and_silent_clients_time_out(start_server):
    server = start_server(timeouts={"request_timeout": 0.5, "idle_timeout": 0.5})
    for data in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # silent; headers never end
        client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client.sendall(data)
        started = time.monotonic()
        assert client.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 3
        client.close()
    # A kept-alive connection is closed once idle.
    connection = server.connection()
    assert server.request("GET", "/healthz", connection=connection).status == 200
    connection.sock.settimeout(5)
    started = time.monotonic()
    assert connection.sock.recv(100) == b""
    assert time.monotonic() - started < 3


def test_shutdown_ends_streams_promptly(pool_dir):
    seed_demo(pool_dir)
    server = RunningServer(pool_dir)
    connection = server.connection()
    connection.request("GET", "/v0/pools/demo/tail?since_seq=1&timeout_ms=30000")
    response = connection.getresponse()
    assert response.status == 200
    idle = server.connection()
    assert server.request("GET", "/healthz", connection=idle).status == 200
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3 and server.result == 0
    assert [message["seq"] for message in jsonl(response.read())] == [1, 2]  # clean end
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


# -- fixtures from the upstream server ------------------------------------------------

VOLATILE_KEYS = {"time", "newest_time", "oldest_time", "newest_age_ms", "oldest_age_ms"}


def normalize(value):
    """Mask what differs between runs: times, ages, and the directory part of paths."""
    if isinstance(value, dict):
        return {key: (type(item).__name__ if key in VOLATILE_KEYS
                      else os.path.basename(item) if key == "path" else normalize(item))
                for key, item in value.items()}
    if isinstance(value, list):
        return [normalize(item) for item in value]
    return value


def read_fixture(name, part):
    path = os.path.join(FIXTURES_HTTP, "%s.%s" % (name, part))
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fixture:
        return fixture.read()


def parse_head(raw):
    lines = raw.decode("latin-1").split("\r\n") if b"\r\n" in raw else raw.decode("latin-1").split("\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def fixture_names():
    return sorted({name.split(".")[0] for name in os.listdir(FIXTURES_HTTP)
                   if name.endswith(".request_headers")})


def lite3_frames(body):
    frames = []
    while body:
        seq, _timestamp, length = struct.unpack(">QQI", body[:20])
        frames.append((seq, body[20:20 + length]))
        body = body[20 + length:]
    return frames


def compare_with_fixture(name, response):
    status_line, expected_headers = parse_head(read_fixture(name, "response_headers"))
    expected_body = read_fixture(name, "response_body") or b""
    assert response.status == int(status_line.split()[1]), name
    assert response.headers.get("content-type") == expected_headers.get("content-type"), name
    for header in ("plasmite-version", "plasmite-seq", "transfer-encoding", "allow"):
        assert response.headers.get(header) == expected_headers.get(header), (name, header)
    content_type = expected_headers.get("content-type", "")
    if content_type == "application/json":
        assert normalize(response.json()) == normalize(json.loads(expected_body)), name
    elif content_type == "application/jsonl":
        assert normalize(jsonl(response.body)) == normalize(jsonl(expected_body)), name
    elif content_type == "application/x-plasmite-lite3-stream":
        assert lite3_frames(response.body) == lite3_frames(expected_body), name
    elif content_type == "application/x-plasmite-lite3":
        assert response.body == expected_body, name  # byte-identical Lite3
    elif content_type.startswith("text/plain"):
        prefix = expected_body.split(b":")[0]
        assert response.body.startswith(prefix), name
    else:
        assert response.body == expected_body, name


def test_upstream_exchanges(start_server, pool_dir):
    """Replay every request captured from upstream; same status, content type and body."""
    seed_demo(pool_dir)
    server = start_server()
    names = fixture_names()
    assert len(names) >= 18
    for name in names:
        request_line, headers = parse_head(read_fixture(name, "request_headers"))
        method, target, _version = request_line.split()
        send = {key: value for key, value in headers.items()
                if key in ("content-type", "accept", "user-agent")}
        response = server.request(method, target, read_fixture(name, "request_body"), send)
        compare_with_fixture(name, response)
    # 90: a tail started before the append it returns.
    results = {}
    follower = threading.Thread(target=lambda: results.update(
        tail=server.request("GET", "/v0/pools/demo/tail?since_seq=4&timeout_ms=1500")))
    follower.start()
    time.sleep(0.2)
    appended = server.request("POST", "/v0/pools/demo/append",
                              {"data": {"live": True}, "tags": ["live"]})
    assert normalize(appended.json()) == normalize(json.loads(read_fixture("90_live_tail",
                                                                           "append_response_body")))
    follower.join(5)
    compare_with_fixture("90_live_tail", results["tail"])


# -- TLS --------------------------------------------------------------------------------

def make_certificate(directory):
    cert = os.path.join(str(directory), "cert.pem")
    key = os.path.join(str(directory), "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(not HAS_OPENSSL, reason="openssl is not installed")
def test_tls_with_certificate_files(start_server, pool_dir, tmp_path):
    seed_demo(pool_dir)
    cert, key = make_certificate(tmp_path)
    server = start_server(tls_cert=cert, tls_key=key)
    assert server.config.base_url.startswith("https://")
    context = ssl.create_default_context(cafile=cert)
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b'{"ok":true}'
    connection.request("GET", "/v0/pools/demo/tail?since_seq=1&max=2&timeout_ms=1000")
    assert [message["seq"] for message in jsonl(connection.getresponse().read())] == [1, 2]
    connection.close()
    with pytest.raises(ssl.SSLError):  # not trusted without the certificate
        untrusted = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=5,
                                                context=ssl.create_default_context())
        untrusted.request("GET", "/healthz")
    # A plain-HTTP client is dropped silently and the server keeps serving.
    plain = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert b"HTTP/1.1" not in plain.recv(100)
    except ConnectionResetError:
        pass
    plain.close()
    again = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    again.request("GET", "/healthz")
    assert again.getresponse().status == 200
    again.close()
    verified = subprocess.run(["openssl", "verify", "-CAfile", cert, cert], capture_output=True)
    assert verified.returncode == 0 and b"OK" in verified.stdout
    if HAS_CURL:
        curled = subprocess.run(["curl", "-sS", "--cacert", cert,
                                 "https://127.0.0.1:%d/healthz" % server.port],
                                capture_output=True, timeout=20)
        assert curled.returncode == 0 and curled.stdout == b'{"ok":true}'


def test_tls_self_signed(start_server, tmp_path):
    server = start_server(tls_self_signed=True)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read() == b'{"ok":true}'
    der = connection.sock.getpeercert(binary_form=True)
    connection.close()
    if HAS_OPENSSL:
        text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"], input=der,
                              capture_output=True).stdout.decode()
        assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text


def test_tls_start_errors(pool_dir, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\n%%%not base64%%%\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    cases = [
        ({"tls_cert": str(tmp_path / "absent.pem"), "tls_key": str(empty)}, "Io",
         "failed to read TLS certificate"),
        ({"tls_cert": str(garbage), "tls_key": str(empty)}, "Io", "failed to parse TLS certificate"),
        ({"tls_cert": str(empty), "tls_key": str(empty)}, "Usage",
         "TLS certificate file contains no certificates"),
    ]
    if HAS_OPENSSL:
        cert, key = make_certificate(tmp_path)
        other_cert, _other_key = make_certificate(tmp_path / ".." / tmp_path.name)
        cases += [({"tls_cert": cert, "tls_key": cert}, "Usage", "TLS key file contains no private key")]
        second = tmp_path / "second"
        second.mkdir()
        _cert2, key2 = make_certificate(second)
        cases += [({"tls_cert": cert, "tls_key": key2}, "Usage", "invalid TLS certificate or key")]
    for options, kind, message in cases:
        config = draft.ServeConfig(str(pool_dir), "127.0.0.1:0", **options)
        with pytest.raises(plasmite.PlasmiteError) as raised:
            draft.run_server(config, threading.Event())
        assert (raised.value.kind, raised.value.message) == (kind, message)


# -- configuration ------------------------------------------------------------------

def usage_error(**options):
    with pytest.raises(plasmite.PlasmiteError) as raised:
        draft.ServeConfig("/tmp/pools", **options)
    assert raised.value.kind == "Usage"
    return raised.value


def test_serve_config_validation(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t0k3n\n")
    blank = tmp_path / "blank"
    blank.write_text(" \n\t")
    for bind in ("nope", "localhost:9700", "127.0.0.1", "127.0.0.1:70000", "[::1]", "::1:80",
                 "1.2.3:80", "01.2.3.4:80"):
        error = usage_error(bind=bind)
        assert error.message == "invalid bind address"
        assert error.hint == "Use a host:port value like 127.0.0.1:9700."
    error = usage_error(token="a", token_file=str(token_file))
    assert error.message == "--token cannot be combined with --token-file" and "serve init" in error.hint
    error = usage_error(token_file=str(tmp_path / "absent"))
    assert error.message == "failed to read token file" and error.causes
    assert usage_error(token_file=str(blank)).message == "token file is empty"
    for bind in ("0.0.0.0:0", "[::]:9700", "[::ffff:127.0.0.1]:9700", "10.1.2.3:80"):
        error = usage_error(bind=bind)
        assert error.message == "non-loopback bind requires explicit opt-in"
        assert "--allow-non-loopback" in error.hint
    assert usage_error(tls_cert="c").message == "TLS requires both --tls-cert and --tls-key"
    error = usage_error(tls_self_signed=True, tls_cert="c", tls_key="k")
    assert error.message.startswith("--tls-self-signed cannot be combined") and "serve init" in error.hint
    assert usage_error(max_body_bytes=0).hint == "Use a positive value like 1048576."
    assert usage_error(max_tail_timeout_ms=0).message == "--max-tail-timeout-ms must be greater than zero"
    assert usage_error(max_tail_concurrency=0).hint == "Use a positive value like 64."
    open_bind = {"bind": "0.0.0.0:0", "allow_non_loopback": True}
    error = usage_error(access="write-only", insecure_no_tls=True, **open_bind)
    assert "--token-file" in error.message and "serve init" in error.hint
    error = usage_error(token="dev", insecure_no_tls=True, **open_bind)
    assert error.message == "non-loopback write requires --token-file"
    error = usage_error(token_file=str(token_file), **open_bind)
    assert error.message == "non-loopback write requires TLS" and "serve init" in error.hint
    # Valid configurations.
    assert draft.ServeConfig("/p", access="read-only", **open_bind).base_url == "http://127.0.0.1:0"
    config = draft.ServeConfig("/p", token_file=str(token_file), insecure_no_tls=True,
                               bind="[::]:9800", allow_non_loopback=True)
    assert config.token == "t0k3n" and config.base_url == "http://[::1]:9800"
    assert draft.ServeConfig("/p", bind="127.1.2.3:1", tls_self_signed=True).base_url == \
        "https://127.1.2.3:1"
    assert draft.ServeConfig("/p", bind="[::1]:80").is_loopback


def test_serve_check_document_and_text(tmp_path):
    document = draft.serve_check_document(draft.ServeConfig("/p"))
    assert document == {"check": {
        "access": "read-write", "auth": "none", "base_url": "http://127.0.0.1:9700",
        "limits": {"max_body_bytes": 1048576, "max_tail_concurrency": 64,
                   "max_tail_timeout_ms": 30000},
        "listen": "127.0.0.1:9700", "status": "valid", "tls": "disabled",
        "web_ui": "http://127.0.0.1:9700/ui", "web_ui_pool": "http://127.0.0.1:9700/ui/pools/demo"}}
    config = draft.ServeConfig("/p", bind="0.0.0.0:9700", allow_non_loopback=True,
                               access="read-only", tls_self_signed=True, token="s3cr3t")
    check = draft.serve_check_document(config)["check"]
    assert check["auth"] == "bearer token (--token)" and check["tls"] == "self-signed"
    assert check["base_url"] == "https://127.0.0.1:9700"
    text = draft.render_serve_check(config)
    assert text.startswith("plasmite serve check\n  status: valid\n  listen: 0.0.0.0:9700\n")
    assert "  auth: bearer token (from --token; value not shown)\n" in text
    assert "  limits: body=1048576B tail_timeout=30000ms tail_concurrency=64\n" in text
    assert "note: listening on all interfaces" in text and "s3cr3t" not in text
    assert text.endswith("\n\n")
    banner = draft.render_serve_banner(config)
    assert "s3cr3t" not in banner and "Bearer <token>" in banner and "curl -k" in banner
    assert "  stop: press Ctrl-C\ntry:\n" in banner


def test_importing_costs_no_network_modules():
    code = ("import sys; sys.path.insert(0, %r); before = set(sys.modules); import plasmite; "
            "print(sorted(set(sys.modules) - before))" % os.path.dirname(plasmite.__file__))
    added = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True,
                           check=True).stdout
    for name in (b"http", b"ssl", b"socket", b"hmac", b"select", b"tempfile", b"urllib"):
        assert b"'" + name not in added, added


# -- the command line -----------------------------------------------------------------

def test_cli_serve_check(tmp_path):
    result = run_pls("--dir", tmp_path, "serve", "check")
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)["check"]
    assert check["status"] == "valid" and "127.0.0.1:9700" in check["base_url"]
    result = run_pls("--dir", tmp_path, "serve", "--bind", "0.0.0.0:0", "check")
    assert result.returncode == 2 and "--allow-non-loopback" in error_of(result)["hint"]
    result = run_pls("serve", "--bind", "nope")
    assert result.returncode == 2 and error_of(result)["message"] == "invalid bind address"
    result = run_pls("serve", "check", "--bind", "127.0.0.1:1")
    assert result.returncode == 2
    assert error_of(result)["message"] == "unexpected argument '--bind' found"
    result = run_pls("serve", "--max-body-bytes", "x", "check")
    assert result.returncode == 2 and "invalid value 'x'" in error_of(result)["message"]
    result = run_pls("serve", "--access", "everything", "check")
    assert result.returncode == 2
    result = run_pls("serve", "--max-tail-concurrency", "0", "check")
    assert error_of(result)["message"] == "--max-tail-concurrency must be greater than zero"
    for arguments, expected_message in (
            (["--token", "dev-token", "--token-file", tmp_path / "t"], None),
            (["--tls-self-signed", "--tls-cert", "c", "--tls-key", "k"], None),
            (["--bind", "0.0.0.0:0", "--allow-non-loopback", "--access", "write-only",
              "--insecure-no-tls"], "--token-file")):
        result = run_pls("serve", *arguments, "check")
        assert result.returncode == 2 and "serve init" in error_of(result)["hint"]
        if expected_message:
            assert expected_message in error_of(result)["message"]
    help_text = run_pls("serve", "init", "--help").stdout.decode()
    assert "Generate token + TLS artifacts" in help_text
    assert "Serve pools over HTTP" in run_pls("--help").stdout.decode()


def test_cli_serve_init(tmp_path):
    output_dir = tmp_path / "artifacts"
    result = run_pls("serve", "init", "--output-dir", output_dir, "--bind", "0.0.0.0:9700")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)["init"]
    paths = document["artifact_paths"]
    assert sorted(paths) == ["tls_cert", "tls_key", "token_file"]
    for path in paths.values():
        assert os.path.exists(path)
    with open(paths["token_file"]) as token_file:
        token = token_file.read()
    assert len(token) == 65 and token.endswith("\n") and int(token, 16) >= 0
    assert token.strip() not in result.stdout.decode()
    assert os.stat(paths["token_file"]).st_mode & 0o777 == 0o600
    assert os.stat(paths["tls_key"]).st_mode & 0o777 == 0o600
    commands = document["next_commands"]
    assert any("plasmite serve --bind 0.0.0.0:9700 --allow-non-loopback" in command
               for command in commands)
    assert commands[2].endswith("'https://127.0.0.1:9700/v0/pools/demo/tail?timeout_ms=5000'")
    assert commands[1].endswith(" https://127.0.0.1:9700/v0/pools/demo/append")
    again = run_pls("serve", "init", "--output-dir", output_dir)
    assert again.returncode == 4 and "--force" in error_of(again)["hint"]
    assert error_of(again)["kind"] == "AlreadyExists"
    forced = run_pls("serve", "init", "--output-dir", output_dir, "--force")
    assert forced.returncode == 0
    with open(paths["token_file"]) as token_file:
        assert token_file.read() != token
    same = run_pls("serve", "init", "--output-dir", tmp_path / "x", "--tls-cert", "a.pem",
                   "--tls-key", "./a.pem")
    assert same.returncode == 2
    assert error_of(same)["message"] == "serve init requires distinct artifact paths"
    bad_bind = run_pls("serve", "init", "--bind", "localhost:1")
    assert bad_bind.returncode == 2 and "0.0.0.0:9700" in error_of(bad_bind)["hint"]
    if HAS_OPENSSL:
        verified = subprocess.run(["openssl", "verify", "-CAfile", paths["tls_cert"],
                                   paths["tls_cert"]], capture_output=True)
        assert verified.returncode == 0
    # The generated artifacts serve HTTPS on loopback.
    port = free_port()
    process = subprocess.Popen(pls_command("--dir", tmp_path, "serve", "--bind", "127.0.0.1:%d" % port,
                                           "--token-file", paths["token_file"],
                                           "--tls-cert", paths["tls_cert"],
                                           "--tls-key", paths["tls_key"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    try:
        wait_for_health(port, context=ssl.create_default_context(cafile=paths["tls_cert"]))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_cli_serve_runs_and_stops_on_signals(tmp_path):
    pools = tmp_path / "pools"
    pools.mkdir()
    seed_demo(pools)
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        process = subprocess.Popen(pls_command("--dir", pools, "serve", "--bind", "127.0.0.1:%d" % port),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL)
        try:
            wait_for_health(port)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/v0/pools/demo/tail?since_seq=1")  # a 30 s stream
            response = connection.getresponse()
            assert response.status == 200
            first = response.readline()  # the stream is running
            started = time.monotonic()
            process.send_signal(stop_signal)
            assert process.wait(10) == 0
            assert time.monotonic() - started < 5
            assert len(jsonl(first + response.read())) >= 1  # ended cleanly (a terminating chunk)
            assert process.stderr.read() == b""  # not a terminal: no banner
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_cli_serve_bind_failure(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run_pls("--dir", tmp_path, "serve", "--bind", "127.0.0.1:%d" % taken.getsockname()[1])
    assert result.returncode == 8
    error = error_of(result)
    assert error["kind"] == "Io" and error["message"] == "failed to bind server"
    assert error["causes"] == ["Address already in use (os error 98)"] or sys.platform != "linux"


def test_cli_banner_on_terminal_hides_token(tmp_path):
    port = free_port()
    master, slave = pty.openpty()
    process = subprocess.Popen(pls_command("--dir", tmp_path, "serve", "--bind", "127.0.0.1:%d" % port,
                                           "--token", "very-secret-token"),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    try:
        wait_for_health(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        output = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    text = output.decode().replace("\r\n", "\n")
    assert text.startswith("plasmite serve\n  listen: 127.0.0.1:%d\n" % port)
    assert "auth: bearer token (from --token; value not shown)" in text
    assert "very-secret-token" not in text and "Bearer <token>" in text
