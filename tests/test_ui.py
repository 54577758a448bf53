"""The web UI page (remote.md 8) driven in headless Chromium over the DevTools protocol.

A real server (run_server in a thread, 127.0.0.1, port 0) serves WEB_UI_HTML;
Chromium loads it and the tests read the live DOM with Runtime.evaluate.  The
DevTools client is a minimal WebSocket client over ``socket`` (standard library
only).  Screenshots go to $PLASMITE_SCREENSHOTS or a temporary directory.
"""

import base64
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import pytest

import plasmite as server_module

WEB_UI_HTML = server_module.WEB_UI_HTML
# Screenshots for a person to look at: PLASMITE_SCREENSHOTS, else a temporary directory.
SCREENSHOT_DIR = os.environ.get("PLASMITE_SCREENSHOTS") or tempfile.mkdtemp(prefix="plasmite-ui-")
os.makedirs(SCREENSHOT_DIR, exist_ok=True)

CHROMIUM = next((path for path in (shutil.which("chromium"), "/usr/bin/chromium",
                                   shutil.which("chromium-browser")) if path and os.path.exists(path)),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium)")
PHONE = (375, 812)
DESKTOP = (1280, 860)
WAIT_SECONDS = 15


# -- the server ---------------------------------------------------------------------


class RunningServer:
    """run_server() on 127.0.0.1 in a thread (port 0 unless given); stop() ends it."""

    def __init__(self, directory, port=0, **options):
        self.directory = str(directory)
        self.config = server_module.ServeConfig(self.directory, "127.0.0.1:%d" % port, **options)
        self.token = options.get("token")
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.address = None
        self.error = None
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
            server_module.run_server(self.config, self.stop_event, on_listening)
        except BaseException as error:  # reported to the test thread
            self.error = error
            self.ready.set()

    @property
    def port(self):
        return self.address[1]

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def request(self, method, path, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {}
        if body is not None:
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheader("content-type"), response.read()
        finally:
            connection.close()

    def create_pool(self, name, size_bytes=262144):
        status, _, body = self.request("POST", "/v0/pools", {"pool": name, "size_bytes": size_bytes})
        assert status == 200, body
        return json.loads(body)["pool"]

    def append(self, name, data, tags=()):
        status, _, body = self.request("POST", "/v0/pools/%s/append" % urllib.parse.quote(name, safe=""),
                                       {"data": data, "tags": list(tags)})
        assert status == 200, body
        return json.loads(body)["message"]

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

    def start(**options):
        server = RunningServer(pool_dir, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


# -- a minimal DevTools client -------------------------------------------------------


class WebSocket:
    """Just enough RFC 6455 for DevTools: masked text frames out, whole messages in."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n"
                           % (parts.path, parts.hostname, parts.port, key)).encode("ascii"))
        self.pending = b""
        while b"\r\n\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the handshake")
            self.pending += chunk
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head

    def _read_exact(self, size):
        while len(self.pending) < size:
            chunk = self.sock.recv(max(65536, size - len(self.pending)))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.pending += chunk
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def send(self, text, opcode=0x1):
        payload = text.encode("utf-8") if isinstance(text, str) else text
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
        self.sock.sendall(header + mask + masked)

    def receive(self):
        parts = []
        while True:
            first, second = self._read_exact(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read_exact(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read_exact(8))[0]
            mask = self._read_exact(4) if second & 0x80 else None
            payload = self._read_exact(length)
            if mask:
                payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("DevTools sent close")
            if opcode == 0x9:
                self.send(payload, opcode=0xA)
                continue
            if opcode == 0xA:
                continue
            parts.append(payload)
            if first & 0x80:
                return b"".join(parts).decode("utf-8")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    """Headless Chromium with a DevTools port; new_page() opens a fresh tab."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="plasmite-ui-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--user-data-dir=" + self.profile, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while True:
            if os.path.exists(port_file):
                lines = open(port_file).read().split()
                if len(lines) >= 2:
                    self.port = int(lines[0])
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)

    def endpoint(self, path, method="GET"):
        request = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), method=method)
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read() or b"null")

    def new_page(self):
        target = self.endpoint("/json/new?about:blank", method="PUT")
        return Page(self, target)

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: navigate, evaluate JavaScript, wait for conditions, take screenshots."""

    def __init__(self, browser, target):
        self.browser = browser
        self.target_id = target["id"]
        self.socket = WebSocket(target["webSocketDebuggerUrl"])
        self.next_id = 0
        self.exceptions = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method, **params):
        self.next_id += 1
        call_id = self.next_id
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.receive())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError("%s failed: %s" % (method, message["error"]))
                return message["result"]
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(message["params"]["exceptionDetails"])

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("evaluate failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression, timeout=WAIT_SECONDS, what=None):
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None  # mid-navigation: the context is being replaced
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError("timed out waiting for %s; page text:\n%s"
                                     % (what or expression, text))
            time.sleep(0.05)

    def goto(self, url):
        self.call("Page.navigate", url=url)
        self.wait_for("location.href === %s && document.readyState === 'complete'" % json.dumps(url),
                      what="navigation to " + url)

    def set_viewport(self, width, height, is_mobile=False):
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=2 if is_mobile else 1, mobile=is_mobile)

    def screenshot(self, name):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = os.path.join(SCREENSHOT_DIR, name)
        with open(path, "wb") as image:
            image.write(base64.b64decode(data))
        return path

    def text(self, selector):
        return self.evaluate("(() => { const node = document.querySelector(%s); "
                             "return node ? node.textContent : null; })()" % json.dumps(selector))

    def click(self, selector):
        self.evaluate("document.querySelector(%s).click()" % json.dumps(selector))

    def class_name(self, selector):
        return self.evaluate("document.querySelector(%s).className" % json.dumps(selector))

    def height(self, selector):
        return self.evaluate("document.querySelector(%s).getBoundingClientRect().height"
                             % json.dumps(selector))

    def texts(self, selector):
        return self.evaluate("Array.from(document.querySelectorAll(%s), node => node.textContent)"
                             % json.dumps(selector))

    def close(self):
        try:
            self.call("Page.navigate", url="about:blank")  # ends open streams
        except (RuntimeError, OSError):
            pass
        self.socket.close()
        try:
            self.browser.endpoint("/json/close/" + self.target_id)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    instance = Browser()
    yield instance
    instance.close()


@pytest.fixture
def page(browser):
    instance = browser.new_page()
    yield instance
    exceptions = instance.exceptions
    instance.close()
    assert not exceptions, "uncaught JavaScript exceptions: %s" % exceptions


# Small page-side helpers, evaluated in the page.
CARD_SEQS = "Array.from(document.querySelectorAll('.card.message'), card => Number(card.dataset.seq))"
STATUS = "document.querySelector('.pill.status') && document.querySelector('.pill.status').textContent"
COUNT = "document.querySelector('.pill.count') && document.querySelector('.pill.count').textContent"


def card_selector(seq):
    return ".card.message[data-seq='%d']" % seq


def wait_for_card(page, seq):
    return page.wait_for("!!document.querySelector(%s)" % json.dumps(card_selector(seq)),
                         what="card #%d" % seq)


def submit_token(page, token):
    page.evaluate("(() => { const input = document.getElementById('token'); input.value = %s; "
                  "document.getElementById('apply').click(); })()" % json.dumps(token))


def horizontal_overflow(page):
    return page.evaluate("document.scrollingElement.scrollWidth")


# -- sample data for the look -----------------------------------------------------------


def fill_showcase_pool(server, name="agents"):
    server.create_pool(name, 1 << 20)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    server.append(name, {"type": "task", "id": "t-1042", "state": "queued", "agent_id": "planner",
                         "summary": "Index the repository and list modules touched by the failing test"},
                  ["task", "planner"])
    server.append(name, {"type": "claim", "task_id": "t-1042", "agent_id": "worker-3", "ts": now,
                         "data": {"body": "claimed; estimated 40s"}}, ["claim"])
    server.append(name, {"type": "progress", "ts": now,
                         "data": {"task_id": "t-1042", "state": "running", "step": 3, "of": 7,
                                  "summary": "Scanning src/ for callers of read_frame"}},
                  ["progress", "worker-3"])
    server.append(name, {"level": "warn", "message": "connection reset by peer; backing off",
                         "attempt": 2, "path": "/var/lib/plasmite/pools/agents.plasmite"},
                  ["net", "retry"])
    server.append(name, {"type": "error", "id": "e-77", "from_id": "worker-2",
                         "body": "Traceback (most recent call last): File \"run.py\", line 12, in "
                                 "<module> ValueError: bad frame length 4294967295 at offset 81920"},
                  ["error", "worker-2"])
    server.append(name, {"type": "result", "task_id": "t-1042", "to_id": "planner",
                         "artifact": "s3://bucket/builds/2026/11/27/" + "x" * 90,
                         "summary": "42 modules, 3 callers, 0 regressions"}, ["done"])
    server.append(name, {"n": 7, "nested": {"list": [1, 2, 3], "flag": True}})


# -- tests --------------------------------------------------------------------------------


def test_page_is_one_self_contained_document(start_server):
    server = start_server()
    for path in ("/ui", "/ui/pools/demo"):
        status, content_type, body = server.request("GET", path)
        assert status == 200
        assert content_type.startswith("text/html")
        text = body.decode("utf-8")
        assert "<title>Plasmite UI</title>" in text
    assert "Plasmite UI" in WEB_UI_HTML
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "http://", "https://", "<link rel=\"stylesheet\"", "<script src"):
        assert banned not in WEB_UI_HTML, banned
    assert 'name="viewport"' in WEB_UI_HTML


@needs_chromium
def test_catalog_lists_pools_sorted_with_links(start_server, page):
    server = start_server()
    server.create_pool("zeta", 65536)
    server.create_pool("alpha")
    server.create_pool("beta two", 131072)
    for number in range(3):
        server.append("alpha", {"n": number})
    page.set_viewport(*DESKTOP)
    page.goto(server.url("/ui"))
    page.wait_for("document.querySelectorAll('.pool-row').length === 3", what="three pool rows")
    assert page.text(".brand") == "PLASMITE UI"
    assert page.text(".pill.kind") == "catalog"
    assert page.evaluate("document.title") == "Plasmite UI"
    assert page.evaluate("document.getElementById('token').type") == "password"
    assert page.evaluate("document.getElementById('token').placeholder") == "Bearer token (optional)"
    assert page.text("#apply") == "Reload"
    assert page.texts(".pool-name") == ["alpha", "beta two", "zeta"]
    hrefs = page.evaluate("Array.from(document.querySelectorAll('.pool-row'), "
                          "row => row.getAttribute('href'))")
    assert hrefs == ["/ui/pools/alpha", "/ui/pools/beta%20two", "/ui/pools/zeta"]
    facts = page.evaluate("Array.from(document.querySelectorAll('.pool-row'), "
                          "row => Array.from(row.querySelectorAll('.pool-facts span'), s => s.textContent))")
    listed = {info["name"]: info for info in json.loads(server.request("GET", "/v0/ui/pools")[2])["pools"]}
    assert facts[0][:3] == ["path: " + listed["alpha"]["path"], "P: %d" % listed["alpha"]["ring_size"],
                            "newest: 3"]
    assert facts[0][3] == "just now"
    assert facts[2][:3] == ["path: " + listed["zeta"]["path"], "P: %d" % listed["zeta"]["ring_size"],
                            "newest: -"]
    assert horizontal_overflow(page) <= DESKTOP[0]
    page.screenshot("catalog_desktop.png")

    # A link opens the pool view.
    page.click(".pool-row")
    page.wait_for("location.pathname === '/ui/pools/alpha'")
    page.wait_for("document.querySelectorAll('.card.message').length === 3", what="alpha's cards")


@needs_chromium
def test_catalog_on_a_phone(start_server, page):
    server = start_server()
    server.create_pool("a-pool-with-a-rather-long-name-that-must-wrap-on-a-phone")
    fill_showcase_pool(server)
    server.create_pool("metrics", 65536)
    page.set_viewport(*PHONE, is_mobile=True)
    page.goto(server.url("/ui"))
    page.wait_for("document.querySelectorAll('.pool-row').length === 3", what="three pool rows")
    assert page.evaluate("window.innerWidth") == PHONE[0]
    assert horizontal_overflow(page) <= PHONE[0]
    assert page.height("#apply") >= 44
    assert page.evaluate("parseFloat(getComputedStyle(document.getElementById('token')).fontSize)") >= 16
    assert page.height(".pool-row") >= 44
    page.screenshot("catalog_375.png")


@needs_chromium
def test_catalog_empty_directory(start_server, page):
    server = start_server()
    page.goto(server.url("/ui"))
    page.wait_for("document.querySelector('.empty') && "
                  "document.querySelector('.empty').textContent === 'No pools found.'",
                  what="No pools found.")
    assert page.evaluate("document.querySelectorAll('.pool-row').length") == 0


@needs_chromium
def test_pool_view_shows_info_and_streams_new_messages(start_server, page):
    server = start_server()
    info = server.create_pool("demo", 1 << 20)
    server.append("demo", {"n": 1}, ["first"])
    server.append("demo", {"n": 2})
    page.set_viewport(*DESKTOP)
    page.goto(server.url("/ui/pools/demo"))
    page.wait_for(STATUS + " === 'live'", what="the live pill")
    page.wait_for(CARD_SEQS + ".length === 2", what="two history cards")
    assert page.evaluate(CARD_SEQS) == [1, 2]
    assert page.evaluate(COUNT) == "2 of 400 buffered"
    assert page.text(".back") == "< back"
    assert page.evaluate("document.querySelector('.back').getAttribute('href')") == "/ui"
    assert page.text(".title") == "pool: demo"
    assert page.text("#apply") == "Apply"
    assert page.evaluate("document.getElementById('token').placeholder") == "Bearer token (optional)"

    # The info panel.
    page.wait_for("document.querySelectorAll('.info-grid dt').length === 7", what="info rows")
    labels = page.texts(".info-grid dt")
    values = dict(zip(labels, page.texts(".info-grid dd")))
    assert labels == ["Pool", "Path", "Size", "Bounds", "Util", "Oldest", "Newest"]
    assert values["Pool"] == "demo"
    assert values["Path"] == info["path"]
    assert values["Size"] == "1.0 MB (ring: offset=%d size=%s)" % (
        info["ring_offset"], "%.1f KB" % (info["ring_size"] / 1024))
    assert values["Bounds"] == "oldest=1 newest=2 count=2"
    assert values["Util"].endswith("%)") and " used, " in values["Util"] and " free (" in values["Util"]
    assert values["Oldest"].endswith("(just now)") and values["Oldest"].startswith("20")
    size_pill = page.text(".pill.size")
    assert size_pill == "%.1f KB pool" % (info["ring_size"] / 1024)
    assert page.evaluate("document.querySelector('.pill.size').hidden") is False

    # Messages appended after the page loaded appear.
    server.append("demo", {"type": "result", "summary": "finished cleanly"},
                  ["done", "retry-later", "boom-fatal"])
    wait_for_card(page, 3)
    card = card_selector(3)
    assert page.text(card + " .card-head") == "#3 \u00b7 just now"
    assert page.evaluate("document.querySelector(%s).title" % json.dumps(card + " .when")).endswith("Z")
    chips = page.evaluate("Array.from(document.querySelectorAll(%s), "
                          "chip => [chip.textContent, chip.className])" % json.dumps(card + " .chip"))
    assert chips == [["done", "chip tone-ok"], ["retry-later", "chip tone-warn"],
                     ["boom-fatal", "chip tone-error"]]
    assert "tone-error" in page.class_name(card)
    assert page.text(card + " .preview") == "finished cleanly"
    assert page.evaluate(COUNT) == "3 of 400 buffered"
    assert page.evaluate(STATUS) == "live"

    # The json section is collapsed and holds the whole message, pretty-printed.
    assert page.evaluate("document.querySelector(%s).open" % json.dumps(card + " details.json")) is False
    page.click(card + " details.json summary")
    pretty = page.wait_for("(() => { const pre = document.querySelector(%s); "
                           "return pre && pre.textContent; })()" % json.dumps(card + " details.json pre"))
    assert json.loads(pretty)["data"] == {"type": "result", "summary": "finished cleanly"}
    assert "\n  " in pretty


@needs_chromium
def test_cards_facts_preview_and_tones(start_server, page):
    server = start_server()
    server.create_pool("facts")
    server.append("facts", {"zz": 1, "ts": "2001-02-03T04:05:06Z", "type": "task", "note": "a   b\n c",
                            "long": "y" * 100, "id": 9, "state": "new"})
    server.append("facts", {"type": "claim", "ts": "2001-02-03T04:05:06.123456789Z",
                            "data": {"task_id": "t9", "body": "inner body " * 40}})
    server.append("facts", {"type": "result", "value": [1, 2]})
    page.goto(server.url("/ui/pools/facts"))
    wait_for_card(page, 3)
    facts = page.evaluate("Array.from(document.querySelectorAll(%s), fact => "
                          "[fact.querySelector('.key').textContent, "
                          "fact.querySelector('.value').textContent])"
                          % json.dumps(card_selector(1) + " .fact"))
    # Preferred keys first, then the others (the server sends keys sorted), at most six;
    # whitespace collapsed, long values cut at 72 characters with an ellipsis.
    assert [key for key, _ in facts] == ["type", "id", "state", "ts", "long", "note"]
    values = dict(facts)
    assert values["note"] == "a b c"
    assert values["id"] == "9"
    assert values["long"] == "y" * 71 + "\u2026"
    assert values["ts"] == "Feb 3 %s" % time.strftime("%H:%M", time.localtime(981173106))
    # No summary/body: compact JSON fallback.
    fallback = page.text(card_selector(1) + " .preview.fallback")
    assert fallback.startswith('{"id":9,') and fallback.endswith('"zz":1}')

    envelope = page.evaluate("Array.from(document.querySelectorAll(%s), fact => fact.textContent)"
                             % json.dumps(card_selector(2) + " .fact"))
    feb_3 = time.strftime("Feb 3 %H:%M", time.localtime(981173106))
    assert envelope == ["typeclaim", "task_idt9", "ts" + feb_3]
    preview = page.text(card_selector(2) + " .preview")
    assert preview.startswith("inner body inner body") and preview.endswith("\u2026") and len(preview) == 220
    assert "tone-accent" in page.class_name(card_selector(2))
    assert "tone-ok" in page.class_name(card_selector(3))

    server.append("facts", {"path": "p" * 200})
    wait_for_card(page, 4)
    value = page.text(card_selector(4) + " .fact .value")
    assert len(value) == 72 and value.endswith("\u2026")


@needs_chromium
def test_user_content_is_text_not_markup(start_server, page):
    server = start_server()
    hostile_name = "<img src=x onerror=window.__pwned=5><b>pool"  # no "/": not a valid pool name
    server.create_pool(hostile_name)
    server.create_pool("xss")
    page.goto(server.url("/ui"))
    page.wait_for("document.querySelectorAll('.pool-row').length === 2")
    assert hostile_name in page.texts(".pool-name")
    assert page.evaluate("document.querySelectorAll('.pool-row img, .pool-row b').length") == 0

    page.goto(server.url("/ui/pools/xss"))
    page.wait_for(STATUS + " === 'live'")
    payload = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
    server.append("xss", {"body": payload, "type": "<b>bold</b>", "<i>key</i>": "<u>v</u>"},
                  ["<script>tag</script>", "<img src=y onerror=\"window.__pwned = 3\">"])
    wait_for_card(page, 1)
    card = card_selector(1)
    text = page.text(card)
    assert "<script>window.__pwned = 1</script>" in text
    assert "<b>bold</b>" in text and "<i>key</i>" in text and "<script>tag</script>" in text
    for tag in ("script", "img", "b", "i", "u"):
        assert page.evaluate("document.querySelectorAll(%s).length" % json.dumps(card + " " + tag)) == 0
    page.click(card + " details.json summary")
    page.wait_for("!!document.querySelector(%s)" % json.dumps(card + " pre"))
    assert page.evaluate("document.querySelectorAll(%s).length" % json.dumps(card + " pre *")) == 0
    time.sleep(0.3)
    assert page.evaluate("window.__pwned === undefined")
    # The title comes from the URL and is text as well.
    page.goto(server.url("/ui/pools/%3Cimg%20src%3Dz%20onerror%3D%22window.__pwned%3D4%22%3E"))
    page.wait_for("!!document.querySelector('.title')")
    assert page.text(".title") == "pool: <img src=z onerror=\"window.__pwned=4\">"
    assert page.evaluate("document.querySelectorAll('.title img').length") == 0
    page.wait_for("!!document.querySelector('.info .error-text')", what="info failure")
    assert page.text(".info .error-text").startswith("pool info failed (404): ")
    assert page.evaluate("window.__pwned === undefined")


@needs_chromium
def test_buffer_keeps_the_newest_n(start_server, page):
    server = start_server()
    server.create_pool("buf")
    for number in range(1, 6):
        server.append("buf", {"n": number})
    page.goto(server.url("/ui/pools/buf?n=3"))
    page.wait_for(CARD_SEQS + ".length === 3")
    assert page.evaluate(CARD_SEQS) == [3, 4, 5]
    assert page.evaluate(COUNT) == "3 of 3 buffered"
    server.append("buf", {"n": 6})
    wait_for_card(page, 6)
    page.wait_for(CARD_SEQS + ".join() === '4,5,6'", what="oldest card removed")
    assert page.evaluate(COUNT) == "3 of 3 buffered"
    # n is clamped to 1..2000.
    page.goto(server.url("/ui/pools/buf?n=0"))
    page.wait_for(CARD_SEQS + ".join() === '6'")
    assert page.evaluate(COUNT) == "1 of 1 buffered"
    page.goto(server.url("/ui/pools/buf?n=99999"))
    page.wait_for(CARD_SEQS + ".length === 6")
    assert page.evaluate(COUNT) == "6 of 2000 buffered"


@needs_chromium
def test_token_gates_the_api_until_given(start_server, page):
    server = start_server(token="secret")
    server.create_pool("guarded")
    server.append("guarded", {"n": 1})

    page.goto(server.url("/ui"))
    page.wait_for("!!document.querySelector('.error-text')", what="the pool list failure")
    failure = page.text(".error-text")
    assert failure.startswith("pool list failed (401): ")
    assert "missing bearer token" in failure
    assert page.evaluate("document.querySelectorAll('.pool-row').length") == 0

    # A wrong token typed in, then Reload.
    submit_token(page, "wrong")
    page.wait_for("document.querySelector('.error-text') && "
                  "document.querySelector('.error-text').textContent.includes('invalid bearer token')")

    # ?token= pre-fills the input and is sent as a bearer token.
    page.goto(server.url("/ui?token=secret"))
    page.wait_for("document.querySelectorAll('.pool-row').length === 1", what="the guarded pool")
    assert page.evaluate("document.getElementById('token').value") == "secret"
    assert page.evaluate("document.querySelector('.pool-row').getAttribute('href')") == \
        "/ui/pools/guarded?token=secret"

    page.goto(server.url("/ui/pools/guarded?token=secret"))
    page.wait_for(STATUS + " === 'live'")
    wait_for_card(page, 1)
    server.append("guarded", {"n": 2})
    wait_for_card(page, 2)


@needs_chromium
def test_pool_view_without_token_shows_errors_until_applied(start_server, page):
    server = start_server(token="secret")
    page.set_viewport(*DESKTOP)
    server.create_pool("guarded")
    server.append("guarded", {"n": 1})
    page.goto(server.url("/ui/pools/guarded"))
    page.wait_for("!!document.querySelector('.card.failure')", what="the stream failure card")
    assert page.text(".info .error-text").startswith("pool info failed (401): ")
    assert page.text(".card.failure .failure-text").startswith("stream failed (401): ")
    assert page.evaluate(STATUS) == "error"
    # Retries every 700 ms fold into the same card instead of flooding the stream.
    page.wait_for("document.querySelector('.failure-count').textContent.startsWith('\u00d7')",
                  what="a repeated failure")
    assert page.evaluate("document.querySelectorAll('.card.failure').length") == 1
    page.screenshot("pool_error_desktop.png")

    submit_token(page, "secret")
    page.wait_for(STATUS + " === 'live'")
    wait_for_card(page, 1)
    assert page.evaluate("document.querySelectorAll('.card.failure').length") == 0
    assert page.evaluate(COUNT) == "1 of 400 buffered"
    page.wait_for("document.querySelectorAll('.info-grid dt').length === 7")


@needs_chromium
def test_stream_error_card_when_server_limit_is_lower(start_server, page):
    server = start_server(max_tail_timeout_ms=1000)
    server.create_pool("short")
    page.goto(server.url("/ui/pools/short"))
    page.wait_for("!!document.querySelector('.card.failure')", what="the stream failure card")
    text = page.text(".card.failure .failure-text")
    assert text.startswith("stream failed (400): ")
    assert "tail timeout exceeds server limit" in text
    assert page.evaluate(STATUS) == "error"


@needs_chromium
def test_reconnects_after_the_stream_ends(start_server, page, pool_dir):
    server = start_server()
    server.create_pool("steady")
    server.append("steady", {"n": 1})
    page.goto(server.url("/ui/pools/steady"))
    page.wait_for(STATUS + " === 'live'")
    wait_for_card(page, 1)
    port = server.port
    server.stop()  # ends the open stream; reconnects then fail until the server is back
    page.wait_for(STATUS + " !== 'live'", what="the pill leaving live")
    page.wait_for("!!document.querySelector('.info .error-text')", what="the info refresh failing")
    page.wait_for(STATUS + " === 'error'")
    assert page.text(".card.failure .failure-text").startswith("stream failed (network): ")
    server = start_server(port=port)
    page.wait_for(STATUS + " === 'live'", what="live again")
    page.wait_for("document.querySelectorAll('.info-grid dt').length === 7", what="the info panel back")
    server.append("steady", {"n": 2})
    wait_for_card(page, 2)
    assert page.evaluate(CARD_SEQS) == [1, 2]  # resumed at last seq + 1, no duplicates


@needs_chromium
def test_pool_view_on_desktop_and_phone(start_server, page):
    server = start_server()
    fill_showcase_pool(server)
    page.set_viewport(*DESKTOP)
    page.goto(server.url("/ui/pools/agents"))
    page.wait_for(STATUS + " === 'live'")
    page.wait_for(CARD_SEQS + ".length === 7")
    page.click(card_selector(7) + " details.json summary")
    page.wait_for("!!document.querySelector('pre')")
    assert horizontal_overflow(page) <= DESKTOP[0]
    assert page.evaluate("document.querySelector('details.info').open") is True
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot("pool_desktop.png")
    page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
    page.screenshot("pool_desktop_bottom.png")

    page.set_viewport(*PHONE, is_mobile=True)
    page.goto(server.url("/ui/pools/agents?n=50"))
    page.wait_for(STATUS + " === 'live'")
    page.wait_for(CARD_SEQS + ".length === 7")
    server.append("agents", {"type": "note", "body": "unbroken-" + "z" * 400,
                             "url": "https://example.invalid/" + "q" * 200}, ["a-very-long-tag-" + "t" * 80])
    wait_for_card(page, 8)
    page.click(card_selector(8) + " details.json summary")
    page.wait_for("!!document.querySelector('pre')")
    assert page.evaluate("window.innerWidth") == PHONE[0]
    assert horizontal_overflow(page) <= PHONE[0]
    # Readable text and tap-sized controls.
    smallest = page.evaluate("Math.min(...Array.from(document.querySelectorAll('main *, header *'))"
                             ".filter(node => node.childNodes.length && node.offsetParent !== null)"
                             ".map(node => parseFloat(getComputedStyle(node).fontSize)))")
    assert smallest >= 11
    assert page.height(".back") >= 40
    assert page.height("#apply") >= 44
    assert page.height("details.json summary") >= 30
    assert page.evaluate(COUNT) == "8 of 50 buffered"
    # On a phone the info panel starts folded, with a one-line brief.
    assert page.evaluate("document.querySelector('details.info').open") is False
    assert page.text(".info-brief") == "oldest=1 newest=7 \u00b7 0.50% used"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot("pool_375.png")
    # The bottom of the stream, where new cards arrive (auto-scrolled there).
    page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
    page.screenshot("pool_375_bottom.png")
