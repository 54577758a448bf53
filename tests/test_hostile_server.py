"""Hostile input to pls serve (issue 6, item 5), against real pls.pyz server processes.

Malformed HTTP, header floods, slowloris clients, oversized and truncated bodies,
invalid UTF-8 and JSON, random bytes on the TLS port, path tricks in pool names and
bad tokens.  Every attack runs while a probe thread GETs /v0/pools on a fresh
connection every ~50 ms: the probe must never fail and its latency must stay normal
(p99 < PROBE_P99_SECONDS, max < PROBE_MAX_SECONDS).  The server's Threads and VmRSS /
VmHWM come from /proc/<pid>/status; its log (stdout) must hold no traceback and no
ERROR line but the expected ones, and it must exit 0 on SIGTERM.

Servers are ``pls.pyz --dir D serve --bind 127.0.0.1:PORT ...`` processes on 127.0.0.1.
Tests that wait for the server's time limits start the same command line through a
two-line launcher that first lowers plasmite's REQUEST/IDLE timeouts (30 s / 60 s
built in) to PLASMITE_HOSTILE_TIMEOUT seconds, so CI need not wait 30 s.

Environment:
  PLASMITE_HOSTILE_SCALE    multiplies the counts below (default 1; e.g. 10 by hand)
  PLASMITE_HOSTILE_SEED     seed of the random attacks (default: random; in every message)
  PLASMITE_HOSTILE_TIMEOUT  the lowered request/idle timeout in seconds (default 3;
                            30 gives the built-in request timeout)

Counts at scale 1 (CI), per run:
  malformed table        ~60 fixed requests (one connection each), not scaled
  random malformed       FUZZ_REQUESTS = 300 mutated requests, one connection each
  header floods          6 fixed floods + FLOOD_CONNECTIONS = 30 stalled 6 MB heads
  connect burst          BURST_CONNECTIONS = 200 sequential connects, held open
  slowloris              SLOW_CONNECTIONS = 100 (60 trickling heads, 20 trickling
                         bodies, 20 silent), each dropped by the server's time limit
  bodies                 ~20 fixed requests, not scaled
  TLS port               TLS_CONNECTIONS = 60 (random bytes, plain HTTP, stalled and
                         trickled hellos, garbage after a handshake)
  pool names             ~25 fixed names x 7 routes + NAME_REQUESTS = 150 random names
  tokens                 ~20 fixed Authorization variants, not scaled

Scale 10 passes on the 2-core reference VM.  Scale 20 finds the limit of a thread per
connection: the server starts about 1000 threads a second, so a faster connect flood
fills the listen backlog and new handshakes (the probe's too) wait for SYN retransmits
(1 s, 3 s, ...), and 2000 trickling clients keep the interpreter busy enough that probe
latency reaches seconds.
"""

import hashlib
import http.client
import json
import os
import random
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest

from test_server import PYZ, free_port, pls_command, seed_demo, wait_for_health

# Fixtures shared with test_server (pytest finds fixtures imported into a module).
from test_server import _built_pyz, pool_dir  # noqa: F401

SCALE = float(os.environ.get("PLASMITE_HOSTILE_SCALE", "1"))
SEED = int(os.environ.get("PLASMITE_HOSTILE_SEED", str(random.SystemRandom().randrange(1 << 32))))
TIMEOUT = float(os.environ.get("PLASMITE_HOSTILE_TIMEOUT", "3"))

FUZZ_REQUESTS = int(300 * SCALE)
FLOOD_CONNECTIONS = int(30 * SCALE)
SLOW_CONNECTIONS = int(100 * SCALE)
TLS_CONNECTIONS = int(60 * SCALE)
NAME_REQUESTS = int(150 * SCALE)
BURST_CONNECTIONS = int(200 * SCALE)

PROBE_INTERVAL = 0.05
PROBE_P99_SECONDS = 0.5
PROBE_MAX_SECONDS = 1.0  # a connect that waits for a SYN retransmit takes 1 s
TOKEN = "4f1c" * 16  # 64 hex digits, the shape serve init writes

# Runs pls's main() from the pyz after lowering the named module constants.
LAUNCHER = ("import json, sys; sys.path.insert(0, sys.argv[1]); import plasmite; "
            "[setattr(plasmite, name, value) for name, value in json.loads(sys.argv[2]).items()]; "
            "sys.exit(plasmite.main(sys.argv[3:]))")


def context_of(label):
    return "%s (PLASMITE_HOSTILE_SEED=%d, PLASMITE_HOSTILE_SCALE=%s)" % (label, SEED, SCALE)


_CONTEXTS = []


def unverified_context():
    """One shared client context (making one loads the CA store: tens of ms)."""
    if not _CONTEXTS:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _CONTEXTS.append(context)
    return _CONTEXTS[0]


# -- a server process and its health -------------------------------------------------

class ServeProcess:
    """A ``pls serve`` process on 127.0.0.1 with its log files; ``stop()`` checks its exit."""

    def __init__(self, directory, log_directory, *serve_args, short_timeouts=False, token=None):
        self.port = free_port()
        self.token = token
        self.is_tls = "--tls-self-signed" in serve_args
        arguments = ["--dir", directory, "serve", "--bind", "127.0.0.1:%d" % self.port]
        arguments += list(serve_args)
        if token is not None:
            arguments += ["--token", token]
        if short_timeouts:
            limits = {"REQUEST_TIMEOUT_SECONDS": TIMEOUT, "IDLE_TIMEOUT_SECONDS": TIMEOUT}
            command = [sys.executable, "-c", LAUNCHER, PYZ[0], json.dumps(limits)]
            command += [str(argument) for argument in arguments]
        else:
            command = pls_command(*arguments)
        self.stdout_path = os.path.join(str(log_directory), "serve-%d.out" % self.port)
        self.stderr_path = os.path.join(str(log_directory), "serve-%d.err" % self.port)
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr,
                                            stdin=subprocess.DEVNULL)
        try:
            wait_for_health(self.port, timeout=20,
                            context=unverified_context() if self.is_tls else None)
        except AssertionError:
            self.process.kill()
            self.process.wait()
            raise

    @property
    def pid(self):
        return self.process.pid

    def connection(self, timeout=10):
        if self.is_tls:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=unverified_context())
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None):
        """One request on a fresh connection; returns (status, headers dict, body)."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if self.token is not None:
            headers.setdefault("Authorization", "Bearer " + self.token)
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return (response.status, {name.lower(): value for name, value in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def status(self):
        """The server's /proc status fields Threads, VmRSS and VmHWM (kB) as ints."""
        fields = {}
        with open("/proc/%d/status" % self.pid) as status_file:
            for line in status_file:
                name, _, value = line.partition(":")
                if name in ("Threads", "VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0])
        return fields

    def wait_for_threads(self, at_most, timeout=15):
        """Wait until the server runs at most ``at_most`` threads; return the last count."""
        deadline = time.monotonic() + timeout
        while True:
            threads = self.status()["Threads"]
            if threads <= at_most or time.monotonic() > deadline:
                return threads
            time.sleep(0.1)

    def stop(self, allowed_errors=()):
        """SIGTERM, expect exit 0; the log must hold no traceback and no unexpected ERROR line.

        ``allowed_errors`` are substrings of ERROR lines that the test provoked on purpose.
        """
        assert self.process.poll() is None, context_of("the server died")
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(20) == 0, context_of("serve did not exit 0")
        with open(self.stdout_path, encoding="utf-8", errors="replace") as log:
            log_text = log.read()
        with open(self.stderr_path, encoding="utf-8", errors="replace") as errors:
            error_text = errors.read()
        assert error_text == "", context_of("serve wrote to stderr: " + error_text[:2000])
        assert "Traceback" not in log_text, context_of(log_text[:4000])
        unexpected = [line for line in log_text.splitlines() if " ERROR " in line
                      and not any(allowed in line for allowed in allowed_errors)]
        assert not unexpected, context_of("\n".join(unexpected[:20]))


@pytest.fixture
def serve(pool_dir, tmp_path):  # noqa: F811 (the fixture imported above)
    """Start ServeProcess instances in the test's pool directory; they are stopped at the end
    (call ``server.stop()`` in the test to check the log and exit status)."""
    servers = []
    log_directory = tmp_path / "logs"
    log_directory.mkdir()

    def start(*serve_args, **options):
        server = ServeProcess(pool_dir, log_directory, *serve_args, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


class Probe:
    """A thread that GETs /v0/pools on a fresh connection every ~50 ms and times it.

    Use as a context manager around an attack: leaving it checks that every
    probe answered 200 and that latency stayed normal.
    """

    def __init__(self, server, label):
        self.server = server
        self.label = label
        self.latencies = []
        self.failures = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.wait(PROBE_INTERVAL):
            started = time.monotonic()
            try:
                status, _headers, body = self.server.request("GET", "/v0/pools")
                if status != 200:
                    self.failures.append("status %d: %r" % (status, body[:200]))
            except Exception as error:  # any failure of the probe is a finding
                self.failures.append(repr(error))
            self.latencies.append(time.monotonic() - started)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, error_type, error, traceback):
        deadline = time.monotonic() + 10
        while len(self.latencies) < 5 and time.monotonic() < deadline:  # also probe after the attack
            time.sleep(PROBE_INTERVAL)
        self.stopping.set()
        self.thread.join(30)
        latencies = sorted(self.latencies) or [0.0]
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        summary = "%s: %d probes, p99 %.3f s, max %.3f s, %d failures" % (
            self.label, len(self.latencies), p99, latencies[-1], len(self.failures))
        print(summary)
        if error_type is not None:
            return
        assert len(latencies) >= 5, context_of("%s: the probe hardly ran" % self.label)
        assert not self.failures, context_of("%s: probe failures %s" % (summary, self.failures[:5]))
        assert p99 < PROBE_P99_SECONDS and latencies[-1] < PROBE_MAX_SECONDS, context_of(summary)


# -- raw exchanges ------------------------------------------------------------------

def exchange(port, data, pieces=1, should_shut=True, timeout=10, context=None):
    """Send raw bytes (in ``pieces`` writes), then read until the server closes.

    Returns (bytes received, whether the connection was reset).  With
    ``should_shut`` the client half-closes after sending, so a request the
    server waits on ends at EOF instead of at its time limit.
    """
    client = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        client = context.wrap_socket(client, server_hostname="localhost")
    received = b""
    try:
        step = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), step):
            client.sendall(data[start:start + step])
        if should_shut and context is None:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed already
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return received, False
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return received, True
    finally:
        client.close()


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def statuses_of(raw):
    """The statuses of the responses in a raw byte stream (pipelined answers included)."""
    return [int(status) for status in STATUS_LINE.findall(raw)]


def client_hello():
    """A real TLS ClientHello record, made with a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def pool_digest(directory, name="demo"):
    with open(os.path.join(str(directory), name + ".plasmite"), "rb") as pool_file:
        return hashlib.sha256(pool_file.read()).hexdigest()


# -- malformed HTTP -----------------------------------------------------------------

JSON_HEADERS = b"Content-Type: application/json\r\nConnection: close\r\n"
OPEN_DEMO = b'{"pool":"demo"}'


def post(path, headers, body):
    return b"POST %s HTTP/1.1\r\nHost: x\r\n%s%s\r\n%s" % (path, JSON_HEADERS, headers, body)


def chunked_open(*chunks, extra=b""):
    return post(b"/v0/pools/open", b"Transfer-Encoding: chunked\r\n" + extra, b"".join(chunks))


# (name, raw request, the statuses of the answers; [] = closed without an answer)
MALFORMED = [
    ("binary garbage line", b"\x00\x01\x02garbage\xff\r\n\r\n", [400]),
    ("one word", b"GET\r\n\r\n", [400]),
    ("four words", b"GET /healthz HTTP/1.1 extra\r\n\r\n", [400]),
    ("empty target", b"GET  HTTP/1.1\r\n\r\n", [400]),
    ("HTTP/0.9", b"GET /healthz\r\n\r\n", [400]),
    ("HTTP/0.9 POST", b"POST /healthz\r\n\r\n", [400]),
    ("unknown method", b"FOO /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", [501]),
    ("lower-case method", b"get /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", [501]),
    ("method with symbols", b"G\x01T /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", [501]),
    ("long method", b"X" * 10000 + b" /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", [501]),
    ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\n\r\n", [505]),
    ("HTTP/2.0", b"GET /healthz HTTP/2.0\r\n\r\n", [505]),
    ("HTTX/1.1", b"GET /healthz HTTX/1.1\r\n\r\n", [400]),
    ("HTTP/1", b"GET /healthz HTTP/1\r\n\r\n", [400]),
    ("HTTP/1.1.1", b"GET /healthz HTTP/1.1.1\r\n\r\n", [400]),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [505]),
    ("NUL in path", b"GET /heal\x00thz HTTP/1.1\r\nConnection: close\r\n\r\n", [404]),
    ("NUL in pool", b"GET /v0/pools/a%00b/info HTTP/1.1\r\nConnection: close\r\n\r\n", [400]),
    ("raw UTF-8 pool", "GET /v0/pools/é/info HTTP/1.1\r\nConnection: close\r\n\r\n".encode(),
     [404]),
    ("raw latin-1 pool", b"GET /v0/pools/\xe9/info HTTP/1.1\r\nConnection: close\r\n\r\n", [400]),
    ("bad percent UTF-8", b"GET /v0/pools/%ff%fe/info HTTP/1.1\r\nConnection: close\r\n\r\n",
     [400]),
    ("absolute form", b"GET http://x/healthz HTTP/1.1\r\nConnection: close\r\n\r\n", [200]),
    ("asterisk form", b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n", [404]),
    ("bad seq", b"GET /v0/pools/demo/messages/-1 HTTP/1.1\r\nConnection: close\r\n\r\n", [400]),
    ("huge seq", b"GET /v0/pools/demo/messages/99999999999999999999999 HTTP/1.1\r\n"
     b"Connection: close\r\n\r\n", [400]),
    ("bad query", b"GET /v0/pools/demo/tail?max=%ff HTTP/1.1\r\nConnection: close\r\n\r\n", [400]),
    ("TLS hello on the plain port", None, [400]),
    ("LF line ends", b"GET /healthz HTTP/1.1\nConnection: close\n\n", [200]),
    ("pipelined", b"GET /healthz HTTP/1.1\r\n\r\n" * 3
     + b"GET /v0/pools HTTP/1.1\r\nConnection: close\r\n\r\n", [200, 200, 200, 200]),
    ("pipelined after an error", b"GET /nope HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n"
     b"Connection: close\r\n\r\n", [404, 200]),
    ("pipelined garbage", b"GET /healthz HTTP/1.1\r\n\r\n\x00\x00\x00\r\n\r\n"
     b"GET /healthz HTTP/1.1\r\n\r\n", [200, 400]),
    ("body on GET", b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /x HTTP/1.1\r\n\r\n",
     [200]),
    ("no Content-Length", post(b"/v0/pools/open", b"", b""), [400]),
    ("Content-Length ok", post(b"/v0/pools/open", b"Content-Length: 15\r\n", OPEN_DEMO), [200]),
    ("negative Content-Length", post(b"/v0/pools/open", b"Content-Length: -15\r\n", OPEN_DEMO),
     [400]),
    ("non-numeric Content-Length", post(b"/v0/pools/open", b"Content-Length: 1e3\r\n", OPEN_DEMO),
     [400]),
    ("empty Content-Length", post(b"/v0/pools/open", b"Content-Length: \r\n", OPEN_DEMO), [400]),
    ("huge Content-Length", post(b"/v0/pools/open", b"Content-Length: " + b"9" * 30 + b"\r\n",
                                 OPEN_DEMO), [400]),
    ("u64 max Content-Length", post(b"/v0/pools/open", b"Content-Length: 18446744073709551615\r\n",
                                    OPEN_DEMO), [413]),
    ("duplicate Content-Length", post(b"/v0/pools/open", b"Content-Length: 2\r\n"
                                      b"Content-Length: 15\r\n", OPEN_DEMO), [400]),
    ("repeated equal Content-Length", post(b"/v0/pools/open", b"Content-Length: 15\r\n"
                                           b"Content-Length: 15\r\n", OPEN_DEMO), [200]),
    ("Content-Length list", post(b"/v0/pools/open", b"Content-Length: 15, 15\r\n", OPEN_DEMO),
     [400]),
    ("Content-Length too short", post(b"/v0/pools/open", b"Content-Length: 2\r\n", OPEN_DEMO),
     [400]),
    ("chunked", chunked_open(b"8\r\n{\"pool\":\r\n", b"7\r\n\"demo\"}\r\n", b"0\r\n\r\n"), [200]),
    ("chunked with extension and trailer", chunked_open(
        b"f;name=value\r\n" + OPEN_DEMO + b"\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"), [200]),
    ("chunk size not hex", chunked_open(b"zz\r\n{}\r\n0\r\n\r\n"), [400]),
    ("negative chunk size", chunked_open(b"-1\r\n{}\r\n0\r\n\r\n"), [400]),
    ("0x chunk size", chunked_open(b"0x2\r\n{}\r\n0\r\n\r\n"), [400]),
    ("underscore chunk size", chunked_open(b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"), [400]),
    ("17-digit chunk size", chunked_open(b"1" + b"0" * 16 + b"\r\n{}\r\n0\r\n\r\n"), [400]),
    ("chunk over the limit", chunked_open(b"FFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n"), [413]),
    ("chunk longer than its size", chunked_open(b"2\r\n{}}}\r\n0\r\n\r\n"), [400]),
    ("chunked body cut short", chunked_open(b"f\r\n{\"po"), []),
    ("gzip transfer coding", post(b"/v0/pools/open", b"Transfer-Encoding: gzip\r\n", OPEN_DEMO),
     [400]),
    ("gzip, chunked", chunked_open(b"f\r\n" + OPEN_DEMO + b"\r\n0\r\n\r\n",
                                   extra=b"Transfer-Encoding: gzip\r\n"), [400]),
    ("chunked and Content-Length", b"POST /v0/pools/open HTTP/1.1\r\nContent-Type: "
     b"application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
     b"f\r\n" + OPEN_DEMO + b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n", [200]),
    ("body cut short", post(b"/v0/pools/open", b"Content-Length: 100\r\n", OPEN_DEMO), []),
    ("head of one CRLF", b"\r\n", []),
]


def test_malformed_requests(serve, pool_dir):  # noqa: F811
    seed_demo(pool_dir)
    digest = pool_digest(pool_dir)
    server = serve()
    requests = 0
    with Probe(server, "malformed table"):
        for name, data, expected in MALFORMED:
            if data is None:
                data = client_hello()
            for pieces in (1, min(len(data), 40)):  # whole, and split into tiny writes
                raw, was_reset = exchange(server.port, data, pieces)
                requests += 1
                statuses = statuses_of(raw)
                # A server that answers before the last piece arrives closes; the late
                # piece then makes the kernel reset the connection, losing the answer.
                assert statuses == expected or (
                    pieces > 1 and was_reset and statuses == expected[:len(statuses)]), (
                    name, pieces, raw[:500])
    assert pool_digest(pool_dir) == digest
    print("malformed table: %d requests" % requests)
    server.stop()


# Requests the random mutations start from (no append_lite3: its 500 Corrupt is legitimate).
CORPUS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /v0/pools HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n",
    b"GET /v0/pools/demo/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /v0/pools/demo/messages/1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v0/pools/demo/tail?since_seq=1&max=2&timeout_ms=100&tag=seed HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v0/ui/pools/demo/events?max=1&timeout_ms=100 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ui/pools/demo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v0/pools/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 15\r\n\r\n{\"pool\":\"demo\"}",
    b"POST /v0/pools/demo/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 42\r\n\r\n{\"data\":{\"k\":\"v\"},\"tags\":[\"t\"],\"durability\":\"fast\"}"[:-8],
    b"POST /v0/pools/fz/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n9\r\n{\"data\":{\r\n3\r\n}}}\r\n0\r\n\r\n",
    b"POST /v0/pools HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 35\r\n\r\n{\"pool\":\"fz\",\"size_bytes\":65536}",
    b"DELETE /v0/pools/fz HTTP/1.1\r\nHost: x\r\n\r\n",
]
HOSTILE_TOKENS = [b"\x00", b"\xff", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"%", b"%00", b"%2F",
                  b"../", b"..%2f", b"\\", b"/", b"?", b"#", b"\xc3\xa9", b"\xed\xa0\x80", b"-1",
                  b"18446744073709551616", b"9" * 40, b"chunked", b"Content-Length: 5\r\n",
                  b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n", b"HTTP/1.1", b"{", b"}", b'"',
                  b"[" * 200, b"\\ud800", b"A" * 70000]
# Answers a mutated request may get: anything but a server error (501/505 are client ones).
ALLOWED_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 414, 415, 422, 423, 431, 501, 505}


def mutate(rng, request):
    """Return a randomly damaged copy of a request: flips, inserts, cuts, duplicates."""
    data = bytearray(request)
    for _ in range(rng.randint(1, 4)):
        operation = rng.randrange(6)
        position = rng.randrange(len(data) + 1)
        if operation == 0 and data:  # flip one byte
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif operation == 1:  # insert a hostile token
            data[position:position] = rng.choice(HOSTILE_TOKENS)
        elif operation == 2:  # cut the request short
            del data[position:]
        elif operation == 3:  # drop a slice
            del data[position:position + rng.randint(1, 20)]
        elif operation == 4:  # repeat a slice
            data[position:position] = data[position:position + rng.randint(1, 60)]
        else:  # replace a digit run with another number
            data = bytearray(re.sub(rb"\d+", lambda match: str(rng.choice(
                [0, 1, 65536, 2**63, 2**64, -5])).encode(), bytes(data), count=1))
    return bytes(data)


@pytest.mark.campaign
def test_random_malformed_requests(serve, pool_dir, tmp_path):  # noqa: F811
    seed_demo(pool_dir)
    rng = random.Random(SEED)
    outside_before = sorted(os.listdir(str(tmp_path)))
    server = serve("--max-body-bytes", "65536")
    baseline = server.status()
    counts = {}
    with Probe(server, "random malformed"):
        for number in range(FUZZ_REQUESTS):
            data = mutate(rng, rng.choice(CORPUS))
            raw, was_reset = exchange(server.port, data, pieces=rng.choice([1, 1, 3, 50]))
            statuses = statuses_of(raw)
            for status in statuses:
                counts[status] = counts.get(status, 0) + 1
            assert set(statuses) <= ALLOWED_STATUSES, context_of(
                "request %d %r -> %r" % (number, data[:300], raw[:300]))
            assert raw == b"" or raw.startswith(b"HTTP/1.1 ") or was_reset, context_of(
                "request %d %r -> %r" % (number, data[:300], raw[:300]))
    print("random malformed: %d requests, statuses %s" % (FUZZ_REQUESTS, sorted(counts.items())))
    assert counts.get(200, 0) and counts.get(400, 0), context_of("the mutations missed: %s" % counts)
    assert sorted(os.listdir(str(tmp_path))) == outside_before
    assert all(name.endswith(".plasmite") for name in os.listdir(str(pool_dir)))
    assert server.wait_for_threads(baseline["Threads"] + 2) <= baseline["Threads"] + 2
    server.stop()


# -- header floods ------------------------------------------------------------------

def test_header_floods(serve):
    server = serve()
    baseline = server.status()
    floods = {
        "5000 headers": b"".join(b"X-%d: y\r\n" % number for number in range(5000)),
        "one 1 MB header line": b"X-Big: " + b"a" * (1 << 20) + b"\r\n",
        "99 lines of 60 KB": b"".join(b"X-%d: %s\r\n" % (number, b"v" * 60000)
                                      for number in range(99)),
        "101 small headers": b"".join(b"X-%d: y\r\n" % number for number in range(101)),
        "70 KB in 2 KB lines": b"".join(b"X-%d: %s\r\n" % (number, b"v" * 2000)
                                        for number in range(35)),
    }
    with Probe(server, "header floods"):
        for name, headers in floods.items():
            raw, was_reset = exchange(server.port, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
            assert statuses_of(raw) == [431] or (raw == b"" and was_reset), (name, raw[:300])
        raw, was_reset = exchange(server.port, b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n")
        assert statuses_of(raw) == [414] or (raw == b"" and was_reset), raw[:300]
        # A large but reasonable head still works: 60 KB in 30 lines.
        large = b"".join(b"X-%d: %s\r\n" % (number, b"v" * 2000) for number in range(30))
        raw, _was_reset = exchange(server.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n"
                                   + large + b"\r\n")
        assert statuses_of(raw) == [200]
        # Many clients send all the header lines they can and stall before the blank line.
        head = b"GET /healthz HTTP/1.1\r\n" + floods["99 lines of 60 KB"]
        clients = [[socket.create_connection(("127.0.0.1", server.port), timeout=10), 0]
                   for _ in range(FLOOD_CONNECTIONS)]
        for client, _sent in clients:
            client.setblocking(False)
        idle_rounds = 0
        deadline = time.monotonic() + 10
        while idle_rounds < 3 and time.monotonic() < deadline:  # until the server stops reading
            has_progress = False
            for entry in clients:
                try:
                    sent = entry[0].send(head[entry[1]:entry[1] + 65536])
                except (BlockingIOError, ConnectionError):
                    sent = 0
                entry[1] += sent
                has_progress = has_progress or sent > 0
            idle_rounds = 0 if has_progress else idle_rounds + 1
            time.sleep(0 if has_progress else 0.1)
        during = server.status()
        for client, _sent in clients:
            client.close()
    growth_mb = (during["VmHWM"] - baseline["VmRSS"]) / 1024
    print("header floods: %d stalled heads, %.1f MB sent in total, peak RSS +%.1f MB" % (
        FLOOD_CONNECTIONS, sum(sent for _client, sent in clients) / 1e6, growth_mb))
    # Before MAX_HEAD_BYTES, 30 stalled heads took the server from 44 MB to 520 MB.
    assert growth_mb < 30 + 0.5 * FLOOD_CONNECTIONS, growth_mb
    assert server.wait_for_threads(baseline["Threads"] + 2) <= baseline["Threads"] + 2
    server.stop()


# -- connection bursts -----------------------------------------------------------------

def test_connect_burst(serve):
    """Connects made in a burst are accepted at once (socketserver's backlog of 5 was not)."""
    server = serve()
    baseline = server.status()
    clients = []
    slowest = 0
    with Probe(server, "connect burst"):
        for _ in range(BURST_CONNECTIONS):
            started = time.monotonic()
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            slowest = max(slowest, time.monotonic() - started)
        for client in clients:
            client.close()
    print("connect burst: %d connections, slowest connect %.3f s" % (len(clients), slowest))
    # A handshake the full backlog dropped waits for a SYN retransmit: 1 s.
    assert slowest < 0.5, slowest
    assert server.wait_for_threads(baseline["Threads"] + 2) <= baseline["Threads"] + 2
    server.stop()


# -- slow and silent clients ----------------------------------------------------------

class SlowClient:
    """A non-blocking connection that sends ``first`` at once, then ``trickle`` a byte a tick."""

    def __init__(self, port, kind, first=b"", trickle=b""):
        self.kind = kind
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.socket.setblocking(False)
        self.started = time.monotonic()  # the idle or request time limit counts from here
        self.trickle = trickle
        self.sent = 0
        self.closed = None  # seconds from start to the server's close
        self.answer = b""
        if first:
            self.socket.sendall(first)

    def tick(self):
        if self.closed is None and self.sent < len(self.trickle):
            try:
                self.sent += self.socket.send(self.trickle[self.sent:self.sent + 1])
            except (BlockingIOError, ConnectionError):
                pass

    def check_closed(self):
        try:
            data = self.socket.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError:
            data = b""
        self.answer += data
        if not data:
            self.closed = time.monotonic() - self.started
            self.socket.close()


def hold_slow_clients(server, clients, tick, label):
    """Trickle every client until the server closes them all; return the peak server status.

    Asserts that each one is closed by the server's time limit: not before
    TIMEOUT and within TIMEOUT plus a generous slack.
    """
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.socket, selectors.EVENT_READ, client)
    peak = server.status()
    next_tick = next_sample = time.monotonic()
    deadline = time.monotonic() + TIMEOUT * 2 + 15
    while selector.get_map() and time.monotonic() < deadline:
        for key, _events in selector.select(timeout=0.05):
            key.data.check_closed()
            if key.data.closed is not None:
                selector.unregister(key.fileobj)
        now = time.monotonic()
        if now >= next_tick:
            for key in list(selector.get_map().values()):
                key.data.tick()
            next_tick = now + tick
        if now >= next_sample:
            status = server.status()
            peak = {name: max(value, status[name]) for name, value in peak.items()}
            next_sample = now + 0.25
    for key in list(selector.get_map().values()):
        key.data.socket.close()
    selector.close()
    open_ones = [client.kind for client in clients if client.closed is None]
    assert not open_ones, context_of("%s: never closed by the server: %s" % (label, open_ones))
    times = sorted(client.closed for client in clients)
    print("%s: %d connections closed after %.2f-%.2f s (limit %.1f s); peak %d threads, "
          "%d MB RSS" % (label, len(clients), times[0], times[-1], TIMEOUT, peak["Threads"],
                         peak["VmRSS"] // 1024))
    assert times[0] > TIMEOUT - 0.5, context_of("%s: closed before the limit" % label)
    assert times[-1] < TIMEOUT + 5, context_of("%s: closed late (%.2f s)" % (label, times[-1]))
    return peak


@pytest.mark.campaign
def test_slowloris(serve, pool_dir):  # noqa: F811
    seed_demo(pool_dir)
    digest = pool_digest(pool_dir)
    server = serve(short_timeouts=True)
    baseline = server.status()
    heads = SLOW_CONNECTIONS * 6 // 10
    bodies = SLOW_CONNECTIONS * 2 // 10
    body_head = (b"POST /v0/pools/demo/append HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 100000\r\n\r\n")
    with Probe(server, "slowloris"):
        clients = [SlowClient(server.port, "head", b"G", b"ET /v0/pools HTTP/1.1\r\nHost: x\r\n"
                              + b"X-Slow: " + b"a" * 1000) for _ in range(heads)]
        clients += [SlowClient(server.port, "body", body_head, b'{"data":{"k":"' + b"a" * 1000)
                    for _ in range(bodies)]
        clients += [SlowClient(server.port, "silent")
                    for _ in range(SLOW_CONNECTIONS - heads - bodies)]
        peak = hold_slow_clients(server, clients, 0.2, "slowloris")
    assert all(client.answer == b"" for client in clients)  # dropped, not answered
    assert peak["Threads"] <= baseline["Threads"] + SLOW_CONNECTIONS + 10, peak
    growth_mb = (peak["VmRSS"] - baseline["VmRSS"]) / 1024
    assert growth_mb < 20 + 0.1 * SLOW_CONNECTIONS, growth_mb
    assert server.wait_for_threads(baseline["Threads"] + 2) <= baseline["Threads"] + 2
    assert pool_digest(pool_dir) == digest
    server.stop()


# -- bodies -----------------------------------------------------------------------------

def json_post(path, body, content_type=b"application/json"):
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (path, content_type, len(body), body))


def answer_of(raw):
    """(status, body) of a single raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


APPEND = b"/v0/pools/demo/append"
LITE3 = b"/v0/pools/demo/append_lite3"
TOO_LARGE = b"Failed to buffer the request body: length limit exceeded"
BAD_JSON = b"Failed to parse the request body as JSON: "
# (name, raw request, status, the start of the body)
BODIES = [
    ("just over the limit", json_post(APPEND, b'{"data":{"k":"' + b"a" * 4080 + b'"}}'), 413,
     TOO_LARGE),
    ("10 MB", json_post(APPEND, b"x" * (10 << 20)), 413, TOO_LARGE),
    ("u64 max length, no body", b"POST /v0/pools/demo/append HTTP/1.1\r\nContent-Type: "
     b"application/json\r\nContent-Length: 18446744073709551615\r\n\r\n", 413, TOO_LARGE),
    ("chunked over the limit", b"POST /v0/pools/demo/append HTTP/1.1\r\nContent-Type: "
     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"800\r\n" + b"a" * 2048 + b"\r\n" + b"800\r\n" + b"a" * 2048 + b"\r\n" + b"1\r\na\r\n"
     + b"0\r\n\r\n", 413, TOO_LARGE),
    ("lite3 over the limit", json_post(LITE3, b"\x00" * 5000, b"application/x-plasmite-lite3"),
     413, TOO_LARGE),
    ("invalid UTF-8 in a value", json_post(APPEND, b'{"data":{"k":"\xff\xfe"}}'), 400,
     BAD_JSON + b"invalid UTF-8"),
    ("invalid UTF-8 in a key", json_post(APPEND, b'{"data":{"\xc3":1}}'), 400,
     BAD_JSON + b"invalid UTF-8"),
    ("overlong UTF-8", json_post(APPEND, b'{"data":{"k":"\xc0\xae"}}'), 400, BAD_JSON),
    ("encoded surrogate", json_post(APPEND, b'{"data":{"k":"\xed\xa0\x80"}}'), 400, BAD_JSON),
    ("lone surrogate escape", json_post(APPEND, b'{"data":{"k":"\\ud800"}}'), 400, BAD_JSON),
    ("NUL in a string", json_post(APPEND, b'{"data":{"k":"\x00"}}'), 400, BAD_JSON),
    ("truncated JSON", json_post(APPEND, b'{"data":{"k":'), 400, BAD_JSON),
    ("trailing garbage", json_post(APPEND, b'{"data":{}} x'), 400, BAD_JSON),
    ("byte order mark", json_post(APPEND, b'\xef\xbb\xbf{"data":{}}'), 400, BAD_JSON),
    ("empty body", json_post(APPEND, b""), 400, BAD_JSON),
    ("nesting past the parser", json_post(APPEND, b"[" * 4000), 400, BAD_JSON),
    ("number out of range", json_post(APPEND, b'{"data":{"k":1' + b"0" * 400 + b'}}'), 400,
     BAD_JSON + b"number out of range"),
    ("array body", json_post(APPEND, b"[1]"), 422, b"Failed to deserialize the JSON body"),
    ("tags not strings", json_post(APPEND, b'{"data":{},"tags":[1]}'), 422,
     b"Failed to deserialize the JSON body"),
    ("data not an object", json_post(APPEND, b'{"data":[1]}'), 400,
     b'{"error":{"kind":"Usage","message":"data must be object"}}'),
    ("nesting too deep for lite3", json_post(APPEND, b'{"data":' + b'{"a":' * 40 + b"1"
                                             + b"}" * 41), 400,
     b'{"error":{"kind":"Usage","message":"failed to encode json as lite3"}}'),
    ("text/plain", json_post(APPEND, b'{"data":{}}', b"text/plain"), 415,
     b"Expected request with `Content-Type: application/json`"),
    ("empty lite3", json_post(LITE3, b"", b"application/x-plasmite-lite3"), 400,
     b'{"error":{"kind":"Usage","message":"lite3 payload is required"}}'),
    ("lite3 as JSON", json_post(LITE3, b'{"data":{}}'), 400,
     b'{"error":{"kind":"Usage","message":"invalid content-type for lite3 append"}}'),
    ("random lite3", json_post(LITE3, bytes(range(256)) * 4, b"application/x-plasmite-lite3"),
     500, b'{"error":{"kind":"Corrupt"'),
]


def test_oversized_truncated_and_invalid_bodies(serve, pool_dir):  # noqa: F811
    seed_demo(pool_dir)
    digest = pool_digest(pool_dir)
    server = serve("--max-body-bytes", "4096", short_timeouts=True)
    with Probe(server, "bodies"):
        for name, data, status, body_start in BODIES:
            raw, _was_reset = exchange(server.port, data)
            assert raw.startswith(b"HTTP/1.1 "), (name, raw[:300])
            assert answer_of(raw)[0] == status and answer_of(raw)[1].startswith(body_start), (
                name, raw[:600])
        # Truncated: the client half-closes, or stalls until the request time limit.
        for data in (json_post(APPEND, b'{"data":{"k":1}}')[:-5],
                     b"POST /v0/pools/demo/append HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"data\""):
            raw, _was_reset = exchange(server.port, data)
            assert raw == b"", raw[:300]
        stalled = [SlowClient(server.port, "stalled body", json_post(APPEND, b'{"data":{"k":1}}')[:-5]),
                   SlowClient(server.port, "stalled chunk",
                              b"POST /v0/pools/demo/append HTTP/1.1\r\nContent-Type: "
                              b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{")]
        hold_slow_clients(server, stalled, 0.2, "stalled bodies")
        assert all(client.answer == b"" for client in stalled)
    assert pool_digest(pool_dir) == digest
    status, _headers, body = server.request("GET", "/v0/pools/demo/info")
    assert status == 200 and json.loads(body)["pool"]["bounds"] == {"newest": 2, "oldest": 1}
    server.stop(allowed_errors=["path=/v0/pools/demo/append_lite3"])


# -- the TLS port -----------------------------------------------------------------------

@pytest.mark.campaign
def test_tls_port_garbage(serve, pool_dir):  # noqa: F811
    seed_demo(pool_dir)
    rng = random.Random(SEED)
    server = serve("--tls-self-signed", short_timeouts=True)
    baseline = server.status()
    hello = client_hello()
    context = unverified_context()
    counts = {}
    with Probe(server, "TLS port"):
        for number in range(TLS_CONNECTIONS):
            kind = rng.choice(["random bytes", "plain HTTP", "hello then garbage", "cut hello",
                               "HTTP garbage over TLS", "random bytes over TLS"])
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "random bytes":
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
            elif kind == "plain HTTP":
                data = b"GET /v0/pools HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            elif kind == "hello then garbage":
                data = hello + bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))
            elif kind == "cut hello":
                data = hello[:rng.randint(1, len(hello) - 1)]
            if kind.endswith("over TLS"):
                # A line end, as a TLS client cannot half-close to end the request.
                garbage = (b"\x00GARBAGE \xff" if kind.startswith("HTTP")
                           else bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))))
                garbage += b"\r\n\r\n"
                raw, was_reset = exchange(server.port, garbage, context=context)
            else:  # the client half-closes: the server must give up on the handshake
                raw, was_reset = exchange(server.port, data)
                assert b"HTTP/" not in raw, context_of("%d %s: %r" % (number, kind, raw[:200]))
                continue
            statuses = statuses_of(raw)
            assert (statuses == [400] or (statuses == [] and was_reset)
                    or set(statuses) <= {400, 414, 431, 501, 505}), context_of(
                "%d %s: %r" % (number, kind, raw[:200]))
        # Handshakes that stall or trickle are dropped by the request time limit.
        slow = [SlowClient(server.port, "stalled hello", hello[:rng.randint(1, len(hello) - 1)])
                for _ in range(5)]
        slow += [SlowClient(server.port, "trickled hello", b"", hello) for _ in range(5)]
        slow += [SlowClient(server.port, "silent") for _ in range(5)]
        peak = hold_slow_clients(server, slow, 0.1, "TLS handshakes")
    print("TLS port: %d connections %s + 15 slow" % (TLS_CONNECTIONS, sorted(counts.items())))
    assert peak["Threads"] <= baseline["Threads"] + 30, peak
    assert server.wait_for_threads(baseline["Threads"] + 2) <= baseline["Threads"] + 2
    server.stop()


# -- pool names ---------------------------------------------------------------------------

# Percent-encoded path segments (the JSON routes get them decoded where they decode).
NAME_TRICKS = [
    "..%2Fevil", "..%2fevil", "%2e%2e%2fevil", "%2E%2E%2Fevil", "%2e%2e", "..", ".", "%2e",
    "%2Ftmp%2Fevil", "..%5C..%5Cevil", "%5C", "a%00b", "%00", "%C3%A9", "%E4%B8%AD%E6%96%87",
    "%F0%9F%92%A9", "%C0%AE%C0%AE%2Fevil", "%ff", "%ED%A0%80", "....%2F%2Fevil",
    "%252e%252e%252fevil", "a" * 300, "%E4%B8%AD" * 90, "evil.plasmite", "..%2Fevil.plasmite",
    "~", "%24HOME", "a%20b", "%0D%0AX-Injected:%20y", "a;b", "a%3Fb", "a%23b", "%09", "%7F",
]
NAME_ROUTES = [("GET", "/v0/pools/%s/info"), ("GET", "/v0/pools/%s/messages/1"),
               ("GET", "/v0/pools/%s/messages/1/lite3"), ("POST", "/v0/pools/%s/append"),
               ("GET", "/v0/pools/%s/tail?timeout_ms=50"), ("GET", "/v0/ui/pools/%s/info"),
               ("DELETE", "/v0/pools/%s")]


def name_problem(name):
    """The kind of 400 a pool name deserves (None if it names a file in the pool directory)."""
    if "/" in name or "\0" in name or not name:
        return "Usage"
    file_name = name if name.endswith(".plasmite") else name + ".plasmite"
    return "Usage" if len(file_name.encode("utf-8")) > 255 else None


def segment_problem(segment):
    """name_problem of a percent-encoded path segment, or "text" if it is not UTF-8."""
    from urllib.parse import unquote_to_bytes

    try:
        return name_problem(unquote_to_bytes(segment).decode("utf-8"))
    except UnicodeDecodeError:
        return "text"  # axum's text/plain path rejection


def plant_sentinels(tmp_path):
    """Files next to the pool directory that no request may create, change or read."""
    (tmp_path / "evil.plasmite").write_bytes(b"sentinel")
    (tmp_path / "evil").write_bytes(b"sentinel")
    return sorted(os.listdir(str(tmp_path)))


def check_confined(tmp_path, pool_dir, outside_before):  # noqa: F811
    assert sorted(os.listdir(str(tmp_path))) == outside_before
    assert (tmp_path / "evil.plasmite").read_bytes() == b"sentinel"
    assert (tmp_path / "evil").read_bytes() == b"sentinel"
    for name in os.listdir(str(pool_dir)):
        assert os.path.isfile(os.path.join(str(pool_dir), name)) and name.endswith(".plasmite"), name


def try_name(server, pool_dir, segment, create=True):  # noqa: F811
    """Create (JSON body), use (every path route) and delete one pool name; check statuses."""
    from urllib.parse import unquote_to_bytes

    problem = segment_problem(segment)
    if create:
        try:
            decoded = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            decoded = segment  # a name of its own, with the percent signs
        status, _headers, body = server.request("POST", "/v0/pools",
                                                {"pool": decoded, "size_bytes": 65536})
        if name_problem(decoded) is None:
            assert status == 200, (segment, body[:300])
            file_name = decoded if decoded.endswith(".plasmite") else decoded + ".plasmite"
            assert json.loads(body)["pool"]["path"] == os.path.join(str(pool_dir), file_name)
        else:
            assert status == 400 and json.loads(body)["error"]["kind"] == "Usage", (segment, body)
    for method, route in NAME_ROUTES:
        body = {"data": {"n": 1}} if method == "POST" else None
        status, headers, answer = server.request(method, route % segment, body)
        if problem == "text":
            assert status == 400 and headers["content-type"].startswith("text/plain"), (
                segment, route, answer)
        elif problem == "Usage":
            assert status == 400 and json.loads(answer)["error"]["kind"] == "Usage", (
                segment, route, answer)
        elif not create:
            assert status == 404, (segment, route, status, answer[:300])
        else:
            assert status in (200, 404), (segment, route, status, answer[:300])
            if route.endswith("/info") and method == "GET":
                assert status == 200 and json.loads(answer)["pool"]["path"].startswith(
                    str(pool_dir) + os.sep), (segment, answer[:300])
    return problem


def test_pool_name_tricks(serve, pool_dir, tmp_path):  # noqa: F811
    outside_before = plant_sentinels(tmp_path)
    server = serve()
    with Probe(server, "pool names"):
        for segment in NAME_TRICKS:
            try_name(server, pool_dir, segment, create=False)
            try_name(server, pool_dir, segment)
        status, _headers, body = server.request("POST", "/v0/pools/open", {"pool": "/tmp/evil"})
        assert status == 400 and json.loads(body)["error"]["message"] == \
            "pool name must not contain path separators"
    check_confined(tmp_path, pool_dir, outside_before)
    server.stop()


NAME_FRAGMENTS = ["..", ".", "/", "\\", "%", "%2e", "%2f", "%5c", "%00", "%ff", "%c3%a9", "é",
                  "中", "\U0001F4A9", " ", "~", ".plasmite", "a", "b", "%0d%0a", "\t", "?", "#",
                  "&", "=", ";", "%25", "+", "a" * 60]


@pytest.mark.campaign
def test_random_pool_names(serve, pool_dir, tmp_path):  # noqa: F811
    rng = random.Random(SEED)
    outside_before = plant_sentinels(tmp_path)
    server = serve()
    problems = {}
    with Probe(server, "random pool names"):
        for _ in range(NAME_REQUESTS // len(NAME_ROUTES)):
            raw_name = "".join(rng.choice(NAME_FRAGMENTS) for _ in range(rng.randint(1, 8)))
            # Keep fragments like %2f as written; encode everything else.
            segment = quote(raw_name, safe="%" if rng.random() < 0.7 else "")
            problem = try_name(server, pool_dir, segment, create=rng.random() < 0.8)
            problems[problem] = problems.get(problem, 0) + 1
    print("random pool names: %d names x %d routes, problems %s" % (
        NAME_REQUESTS // len(NAME_ROUTES), len(NAME_ROUTES), problems))
    check_confined(tmp_path, pool_dir, outside_before)
    server.stop()


# -- tokens -------------------------------------------------------------------------------

def token_request(port, *authorizations, path=b"/v0/pools"):
    lines = b"".join(b"Authorization: " + value + b"\r\n" for value in authorizations)
    raw, _was_reset = exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + lines
                               + b"Connection: close\r\n\r\n")
    return answer_of(raw)


def test_tokens(serve, pool_dir):  # noqa: F811
    seed_demo(pool_dir)
    server = serve(token=TOKEN)
    token = TOKEN.encode()
    wrong = [b"", b"Bearer", b"Bearer ", b"Bearer " + token[:-1], b"Bearer " + token + b"0",
             b"Bearer " + token * 100, b"Bearer " + b"x" * 60000, b"bearer " + token,
             b"BEARER " + token, b"Basic dXNlcjpwYXNz", b"Token " + token, b"Bearer  " + token,
             b"Bearer " + token + b" ", b"Bearer\t" + token, b"Bearer" + token,
             b"Bearer " + token.upper(), b"Bearer " + token[:-1] + b"\xe9",
             b"Bearer " + token[:-2] + "é".encode(), b"Bearer " + token + b"\x00",
             b"Bearer " + token[:32], b"\xff\xfe"]
    with Probe(server, "tokens"):
        assert token_request(server.port, b"Bearer " + token)[0] == 200
        assert token_request(server.port, b" Bearer " + token)[0] == 200  # leading space: OWS
        assert token_request(server.port) == (
            401, b'{"error":{"kind":"Permission","message":"missing bearer token"}}')
        for value in wrong:
            assert token_request(server.port, value) == (
                401, b'{"error":{"kind":"Permission","message":"invalid bearer token"}}'), value
        for pair in ((b"Bearer " + token, b"Bearer x"), (b"Bearer x", b"Bearer " + token),
                     (b"Bearer " + token, b"Bearer " + token)):
            assert token_request(server.port, *pair)[0] == 401, pair
        for value in wrong[:5]:  # public routes ignore the header
            assert token_request(server.port, value, path=b"/healthz")[0] == 200
    server.stop()
    unicode_token = "tökén-ключ"
    server = serve(token=unicode_token)
    assert token_request(server.port, b"Bearer " + unicode_token.encode("utf-8"))[0] == 200
    assert token_request(server.port, b"Bearer " + unicode_token.encode("utf-8")[:-1])[0] == 401
    assert token_request(server.port, b"Bearer " + "tökén".encode("latin-1") + b"-")[0] == 401
    server.stop()
