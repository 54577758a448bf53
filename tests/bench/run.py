"""Side-by-side benchmark of plasmite.py and a sqlite3 message log (a script, not a test).

Usage: python3 tests/bench/run.py [--quick] [--repeat N] [--only 1,3] [--pyz PATH] [--json FILE]

Prints one table: for each workload of issue 7 the plasmite.py number, the
number of a sqlite3 message log doing the same job, their ratio
(plasmite.py / sqlite3) and the target.  The sqlite3 log is the table
``log (seq INTEGER PRIMARY KEY, time, tags, data TEXT)`` in WAL mode with
synchronous=NORMAL and autocommit, so every INSERT is its own committed
transaction and visible to readers at once, like a pool append.  Readers
poll ``WHERE seq > ? ORDER BY seq`` and build the JSON line pls prints.

Rows: 1 in-process append; 2 four writer processes; 3 stdin ingest through
one process; 4 read-back (API and ``pls peek``); 5 wake-up latency and idle
follower CPU; 6 start-up per Python; 7 HTTP (``pls serve``); 8 memory.
Only public entry points are measured: the Python API (Client, Pool,
Stream, Durability) and the dist/pls.pyz CLI and server.  Counts are
medians of --repeat repetitions on fresh pools and databases, except the
time-based rows 5 and 8 (one run each, many samples).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THIS = os.path.abspath(__file__)
MESSAGE = (b'{"id": %d, "kind": "order", "status": "green", "amount": 12.5, '
           b'"user": "alice", "msg": "request timeout on host-7"}')
TAGS = ["orders"]
SCHEMA = "CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, time INTEGER, tags TEXT, data TEXT)"
INSERT = "INSERT INTO log (time, tags, data) VALUES (?, ?, ?)"
POLL_INTERVAL = 0.001           # sqlite3 followers poll every millisecond
POOL_SIZE = 128 * 1024 * 1024   # holds the largest count of ~120-byte messages without wrapping
MB = 1024 * 1024

# The sqlite3 counterparts of `pls poke POOL < file` and `pls peek POOL --tail N
# --jsonl`: standalone scripts, as a user would write them, run as processes.
SQLITE_PRELUDE = """\
import json, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute(%r)
""" % SCHEMA
SQLITE_INGEST = SQLITE_PRELUDE + """\
insert = db.execute
for line in sys.stdin.buffer:
    line = line.strip()
    if line:
        json.loads(line)
        insert(%r, (time.time_ns(), "[]", line.decode()))
""" % INSERT
SQLITE_DUMP = SQLITE_PRELUDE + """\
gmtime, strftime, write = time.gmtime, time.strftime, sys.stdout.write
for seq, ns, tags, data in db.execute(
        "SELECT seq, time, tags, data FROM log WHERE seq > (SELECT MAX(seq) FROM log) - ? ORDER BY seq",
        (int(sys.argv[2]),)):
    write('{"data":%s,"meta":{"tags":%s},"seq":%d,"time":"%s.%09dZ"}\\n'
          % (data, tags, seq, strftime("%Y-%m-%dT%H:%M:%S", gmtime(ns // 1000000000)), ns % 1000000000))
"""


# -- shared helpers --------------------------------------------------------------

def message(i: int) -> bytes:
    return MESSAGE % (100000 + i)


def rfc3339(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1000000000)) + ".%09dZ" % (ns % 1000000000)


def sqlite_line(seq, ns, tags, data) -> str:
    """The JSON line pls prints for a message, built from a sqlite3 row."""
    return '{"data":%s,"meta":{"tags":%s},"seq":%d,"time":"%s"}' % (data, tags, seq, rfc3339(ns))


def sqlite_open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(SCHEMA)
    return db


def import_plasmite():
    sys.path.insert(0, ROOT)
    import plasmite
    return plasmite


def median_dicts(runs: list) -> dict:
    """Median of each numeric key over repetitions; other values from the first run."""
    return {key: (statistics.median(run[key] for run in runs)
                  if isinstance(value, (int, float)) and not isinstance(value, bool) else value)
            for key, value in runs[0].items()}


def mismatches(expected: list, found: list) -> int:
    """Messages lost plus messages duplicated or unexpected."""
    return len(set(expected) - set(found)) + len(found) - len(set(found) & set(expected))


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc/<pid>/stat."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_status() -> dict:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    status = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                status[key] = int(value.split()[0]) * 1024
    return status


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Children:
    """Spawns child processes and kills whatever is still running on exit."""

    def __init__(self):
        self.processes = []

    def popen(self, args, **options) -> subprocess.Popen:
        process = subprocess.Popen(args, **options)
        self.processes.append(process)
        return process

    def child(self, mode: str, *args, **options) -> subprocess.Popen:
        """Run one of this script's child modes (see CHILD_MODES)."""
        options.setdefault("stdin", subprocess.PIPE)
        options.setdefault("stdout", subprocess.PIPE)
        return self.popen([sys.executable, THIS, "--child", mode, json.dumps(args)], **options)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def await_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    if line != b"ready\n":
        raise RuntimeError("child did not start: %r" % line)


def result_of(process: subprocess.Popen, timeout=600) -> dict:
    """The JSON object a child prints last."""
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError("child failed with exit %d" % process.returncode)
    return json.loads(output.splitlines()[-1])


def wall_time(args, stdin=None, timeout=600) -> tuple:
    """Run a command to completion (stdout to /dev/null); return (seconds, exit code).

    Waits with a blocking wait, not subprocess's timeout: with a timeout, Popen.wait
    polls with sleeps of up to 50 ms, which rounded every start-up time to ~64 ms.
    A watchdog kills the command after ``timeout`` seconds.
    """
    started = time.perf_counter()
    process = subprocess.Popen(args, stdin=stdin, stdout=subprocess.DEVNULL)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        code = process.wait()
    finally:
        watchdog.cancel()
    return time.perf_counter() - started, code


def row(number, workload, pls, sqlite, unit, target="", met=None, note="", **raw) -> dict:
    ratio = pls / sqlite if isinstance(pls, (int, float)) and isinstance(sqlite, (int, float)) and sqlite else None
    return {"row": str(number), "workload": workload, "pls": pls, "sqlite": sqlite, "unit": unit,
            "ratio": ratio, "target": target, "met": met, "note": note, "raw": raw}


# -- child processes (python3 run.py --child MODE JSON-ARGS) ---------------------

def appender(kind, target):
    """A function appending one message (JSON bytes) to a pool (kind "pls", target
    [directory, name]) or to a sqlite3 log (kind "sqlite", target path)."""
    if kind == "pls":
        plasmite = import_plasmite()
        pool = plasmite.Client(target[0]).open_pool(target[1])
        fast = plasmite.Durability.FAST
        return lambda payload: pool.append_json(payload, TAGS, fast)
    db = sqlite_open(target)
    tags = json.dumps(TAGS)
    return lambda payload: db.execute(INSERT, (time.time_ns(), tags, payload.decode()))


def child_writer(kind, target, first, count):
    """Append `count` messages after the parent's go (a line on stdin); print the end time."""
    append = appender(kind, target)
    payloads = [message(i) for i in range(first, first + count)]
    print("ready", flush=True)
    sys.stdin.readline()
    for payload in payloads:
        append(payload)
    print(json.dumps({"end": time.monotonic()}))


def child_paced(kind, target, count, rate):
    """Append `count` messages at `rate` per second, each carrying its time.time_ns()."""
    append = appender(kind, target)
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        append(b'{"sent_ns": %d, ' % time.time_ns() + message(i)[1:])
    print(json.dumps({}))


def child_pls_follower(directory, name, count):
    """Follow new messages with a Stream; stamp each arrival; print latencies in ms."""
    plasmite = import_plasmite()
    pool = plasmite.Client(directory).open_pool(name)
    arrivals = []
    with pool.open_stream() as stream:
        print("ready", flush=True)
        for _ in range(count):
            raw = stream.next_json()
            arrivals.append((time.time_ns(), raw))
    print(json.dumps({"latencies": [(ns - json.loads(raw)["data"]["sent_ns"]) / 1e6
                                    for ns, raw in arrivals]}))


def child_sqlite_follower(path, count, print_lines):
    """Poll every POLL_INTERVAL; stamp arrivals (or print each row as a JSON line)."""
    db = sqlite_open(path)
    last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM log").fetchone()[0]
    arrivals = []
    query = "SELECT seq, time, tags, data FROM log WHERE seq > ? ORDER BY seq"
    if not print_lines:
        print("ready", flush=True)
    while len(arrivals) < count:
        rows = db.execute(query, (last,)).fetchall()
        now = time.time_ns()
        for seq, ns, tags, data in rows:
            if print_lines:
                sys.stdout.write(sqlite_line(seq, ns, tags, data) + "\n")
            arrivals.append((now, data))
            last = seq
        if print_lines and rows:
            sys.stdout.flush()
        if not rows:
            time.sleep(POLL_INTERVAL)
    if not print_lines:
        print(json.dumps({"latencies": [(ns - json.loads(data)["sent_ns"]) / 1e6
                                        for ns, data in arrivals]}))


def child_rss_follower(directory, name):
    """Read every message of a pool with a Stream; report memory before and after."""
    plasmite = import_plasmite()
    pool = plasmite.Client(directory).open_pool(name)
    before = memory_status()
    count = size = 0
    with pool.open_stream(since_seq=0, timeout_ms=0) as stream:
        for raw in stream:
            count += 1
            size += len(raw)
    print(json.dumps({"before": before, "after": memory_status(), "count": count, "bytes": size}))


def child_big_message(directory, name, size):
    """Append one message of `size` bytes, read it back; peak memory per phase in copies."""
    plasmite = import_plasmite()
    pool = plasmite.Client(directory).create_pool(name, size * 2 + 64 * MB)
    payload = b'{"blob": "' + b"x" * size + b'"}'

    def copies(action, *args):
        before = memory_status()
        exact = reset_peak_rss()
        started = time.perf_counter()
        result = action(*args)
        seconds = time.perf_counter() - started
        after = memory_status()
        peak = after["VmHWM"] - before["VmRSS"] - (after["RssFile"] - before["RssFile"])
        return result, {"copies": peak / size, "seconds": seconds, "exact_peak": exact}

    receipt, append = copies(pool.append_json, payload, ["big"], plasmite.Durability.FAST)
    seq = json.loads(receipt)["seq"]
    del payload, receipt
    raw, get_json = copies(pool.get_json, seq)
    assert len(raw) > size
    del raw
    frame, get_lite3 = copies(pool.get_lite3, seq)
    assert len(frame.payload) > size
    print(json.dumps({"append": append, "get_json": get_json, "get_lite3": get_lite3}))


CHILD_MODES = {function.__name__[len("child_"):]: function for function in (
    child_writer, child_paced, child_pls_follower, child_sqlite_follower, child_rss_follower,
    child_big_message)}


# -- the workloads ----------------------------------------------------------------

class Bench:
    def __init__(self, options, plasmite, scratch):
        self.options = options
        self.plasmite = plasmite
        self.scratch = scratch
        self.pyz = options.pyz
        self.counter = 0
        quick = options.quick
        self.count = 5000 if quick else 100000

    def fresh(self):
        """A new empty pool directory and sqlite3 path: (client, directory, sqlite path)."""
        self.counter += 1
        directory = os.path.join(self.scratch, "run%d" % self.counter)
        os.mkdir(directory)
        return self.plasmite.Client(directory), directory, os.path.join(directory, "log.sqlite3")

    def repeated(self, measure) -> dict:
        return median_dicts([measure() for _ in range(self.options.repeat)])

    def pls(self, directory, *args):
        return [sys.executable, self.pyz, "--dir", directory] + list(args)

    def fill(self, pool, count) -> None:
        fast = self.plasmite.Durability.FAST
        for i in range(count):
            pool.append_json(message(i), TAGS, fast)

    def filled(self, count):
        """A fresh pool and sqlite3 log each holding `count` messages."""
        client, directory, path = self.fresh()
        pool = client.create_pool("bench", POOL_SIZE)
        self.fill(pool, count)
        db = sqlite_open(path)
        db.execute("BEGIN")
        db.executemany(INSERT, ((time.time_ns(), json.dumps(TAGS), message(i).decode()) for i in range(count)))
        db.execute("COMMIT")
        return client, pool, directory, db, path

    def row1_append(self):
        n = self.count
        fast = self.plasmite.Durability.FAST

        def measure():
            client, _, path = self.fresh()
            pool = client.create_pool("bench", POOL_SIZE)
            db = sqlite_open(path)
            payloads = [message(i) for i in range(n)]
            texts = [payload.decode() for payload in payloads]
            tags_text = json.dumps(TAGS)
            started = time.perf_counter()
            for payload in payloads:
                pool.append_json(payload, TAGS, fast)
            pls = n / (time.perf_counter() - started)
            started = time.perf_counter()
            for text in texts:
                db.execute(INSERT, (time.time_ns(), tags_text, text))
            sqlite = n / (time.perf_counter() - started)
            client.close()
            db.close()
            return {"pls": pls, "sqlite": sqlite}

        result = self.repeated(measure)
        ratio = result["pls"] / result["sqlite"]
        return [row(1, "in-process append, ~120 B JSON, 1 tag, fast", result["pls"], result["sqlite"],
                    "msg/s", ">= 2x", ratio >= 2, "%d messages; append_json vs autocommit INSERT" % n)]

    def row2_writers(self):
        n, writers = self.count, 4
        share = n // writers

        def run_writers(children, kind, target):
            processes = [children.child("writer", kind, target, w * share, share) for w in range(writers)]
            for process in processes:
                await_ready(process)
            started = time.monotonic()
            for process in processes:
                process.stdin.write(b"go\n")
                process.stdin.flush()
            ends = [result_of(process)["end"] for process in processes]
            return writers * share / (max(ends) - started)

        def measure():
            client, directory, path = self.fresh()
            pool = client.create_pool("bench", POOL_SIZE)
            sqlite_open(path).close()
            with Children() as children:
                pls = run_writers(children, "pls", [directory, "bench"])
                sqlite = run_writers(children, "sqlite", path)
            expected = sorted(100000 + i for i in range(writers * share))
            with pool.open_stream(since_seq=0, timeout_ms=0) as stream:
                pls_ids = sorted(json.loads(raw)["data"]["id"] for raw in stream)
            db = sqlite_open(path)
            sqlite_ids = sorted(json.loads(data)["id"] for (data,) in db.execute("SELECT data FROM log"))
            db.close()
            client.close()
            return {"pls": pls, "sqlite": sqlite, "pls_wrong": mismatches(expected, pls_ids),
                    "sqlite_wrong": mismatches(expected, sqlite_ids)}

        runs = [measure() for _ in range(self.options.repeat)]
        result = median_dicts(runs)
        lost = sum(run["pls_wrong"] for run in runs)
        sqlite_lost = sum(run["sqlite_wrong"] for run in runs)
        ratio = result["pls"] / result["sqlite"]
        return [row(2, "4 writer processes appending at once", result["pls"], result["sqlite"], "msg/s",
                    ">= 1.5x, no loss", ratio >= 1.5 and lost == 0,
                    "%d x %d messages per run; lost or duplicated: pls %d, sqlite3 %d (all runs)"
                    % (writers, share, lost, sqlite_lost), runs=runs)]

    def row3_ingest(self):
        n = self.count
        script = os.path.join(self.scratch, "sqlite_ingest.py")
        lines = os.path.join(self.scratch, "ingest.jsonl")
        with open(script, "w") as handle:
            handle.write(SQLITE_INGEST)
        with open(lines, "wb") as handle:
            handle.writelines(message(i) + b"\n" for i in range(n))

        def measure():
            client, directory, path = self.fresh()
            client.create_pool("bench", POOL_SIZE)
            with open(lines, "rb") as stdin:
                pls_seconds, code = wall_time(self.pls(directory, "poke", "bench"), stdin)
            stored = json.loads(client.pool_info_json("bench"))["metrics"]["message_count"]
            if code != 0 or stored != n:
                raise RuntimeError("pls poke: exit %d, %d of %d messages stored" % (code, stored, n))
            with open(lines, "rb") as stdin:
                sqlite_seconds, code = wall_time([sys.executable, script, path], stdin)
            rows = sqlite_open(path).execute("SELECT COUNT(*) FROM log").fetchone()[0]
            if code != 0 or rows != n:
                raise RuntimeError("sqlite ingest: exit %d, %d of %d rows" % (code, rows, n))
            client.close()
            return {"pls": n / pls_seconds, "sqlite": n / sqlite_seconds}

        result = self.repeated(measure)
        ratio = result["pls"] / result["sqlite"]
        return [row(3, "stdin ingest, one process (pls poke < file)", result["pls"], result["sqlite"],
                    "msg/s", ">= 1.7x, >= 34k/s", ratio >= 1.7 and result["pls"] >= 34000,
                    "%d JSON lines; wall time incl. start-up; sqlite3: python3 script.py < file" % n)]

    def row4_read(self):
        n = self.count
        script = os.path.join(self.scratch, "sqlite_dump.py")
        with open(script, "w") as handle:
            handle.write(SQLITE_DUMP)
        timeout = 0.1

        def measure():
            client, pool, directory, db, path = self.filled(n)
            started = time.perf_counter()
            with pool.open_stream(since_seq=1, max_messages=n, timeout_ms=0) as stream:
                count = sum(1 for _ in stream)
            api = n / (time.perf_counter() - started)
            started = time.perf_counter()
            with pool.open_lite3_stream(since_seq=1, max_messages=n, timeout_ms=0) as stream:
                frames = sum(1 for _ in stream)
            lite3 = n / (time.perf_counter() - started)
            query = "SELECT seq, time, tags, data FROM log WHERE seq > ? ORDER BY seq"
            started = time.perf_counter()
            lines = 0
            for fields in db.execute(query, (0,)):
                sqlite_line(*fields).encode()
                lines += 1
            sqlite_api = n / (time.perf_counter() - started)
            started = time.perf_counter()
            raw_rows = sum(1 for _ in db.execute(query, (0,)))
            sqlite_raw = n / (time.perf_counter() - started)
            if not count == frames == lines == raw_rows == n:
                raise RuntimeError("read back %d/%d/%d/%d of %d" % (count, frames, lines, raw_rows, n))
            peek = self.pls(directory, "peek", "bench", "--tail", str(n), "--jsonl",
                            "--timeout", "%dms" % (timeout * 1000))
            seconds, code = wall_time(peek)
            if code != 124:
                raise RuntimeError("pls peek --timeout exited %d, not 124" % code)
            sqlite_seconds, code = wall_time([sys.executable, script, path, str(n)])
            if not checked:     # once: peek prints the whole tail (and so does the sqlite3 script)
                checked.append(True)
                for command in (peek, [sys.executable, script, path, str(n)]):
                    lines = subprocess.run(command, stdout=subprocess.PIPE, timeout=600).stdout.count(b"\n")
                    if lines != n:
                        raise RuntimeError("%s printed %d lines, not %d" % (command[2:5], lines, n))
            client.close()
            db.close()
            return {"api": api, "lite3": lite3, "sqlite_api": sqlite_api, "sqlite_raw": sqlite_raw,
                    "peek": n / (seconds - timeout), "sqlite_peek": n / sqlite_seconds}

        checked = []
        result = self.repeated(measure)
        return [
            row("4a", "in-process read-back, Stream -> JSON bytes", result["api"], result["sqlite_api"],
                "msg/s", ">= 150k/s", result["api"] >= 150000,
                "%d messages; sqlite3 builds the same JSON line per row" % n),
            row("4b", "in-process read-back, Lite3 frame stream", result["lite3"], result["sqlite_raw"],
                "msg/s", "", None, "sqlite3: raw row tuples, no formatting"),
            row("4c", "pls peek --tail N --jsonl > /dev/null", result["peek"], result["sqlite_peek"],
                "msg/s", ">= 70k/s", result["peek"] >= 70000,
                "wall time incl. start-up minus the --timeout %dms peek needs to exit; "
                "sqlite3: python3 dump.py > /dev/null" % (timeout * 1000))]

    def row5_latency(self):
        rate = 200
        count = 200 if self.options.quick else 1000
        idle = 2.0 if self.options.quick else 10.0
        client, directory, path = self.fresh()
        pool = client.create_pool("bench", POOL_SIZE)
        db = sqlite_open(path)
        fast = self.plasmite.Durability.FAST
        ping_pls = lambda: pool.append_json(b'{"ping": 1}', [], fast)  # noqa: E731
        ping_sqlite = lambda: db.execute(INSERT, (time.time_ns(), "[]", '{"ping": 1}'))  # noqa: E731
        peek = self.pls(directory, "peek", "bench", "--jsonl")
        with Children() as children:
            # A follower stamping arrivals itself: API Stream vs sqlite3 poller.
            latency = {}
            for name, follower, writer in (
                    ("pls", ("pls_follower", directory, "bench", count), ("pls", [directory, "bench"])),
                    ("sqlite", ("sqlite_follower", path, count, False), ("sqlite", path))):
                process = children.child(*follower)
                await_ready(process)
                result_of(children.child("paced", *writer, count, rate))
                latency[name] = result_of(process)["latencies"]
            # A follower printing JSON lines to a pipe, stamped by this process.
            for name, command, ping, writer in (
                    ("pls_peek", peek, ping_pls, ("pls", [directory, "bench"])),
                    ("sqlite_print", [sys.executable, THIS, "--child", "sqlite_follower",
                                      json.dumps([path, 10 ** 9, True])], ping_sqlite, ("sqlite", path))):
                process = children.popen(command, stdout=subprocess.PIPE)
                self.await_line(process, ping)
                latency[name] = self.stamp_lines(process, children.child("paced", *writer, count, rate), count)
                process.kill()
            # Idle followers, all at once: CPU over `idle` seconds.
            idle_client, idle_directory, idle_path = self.fresh()
            idle_pool = idle_client.create_pool("idle", POOL_SIZE)
            sqlite_open(idle_path).close()
            api = children.child("pls_follower", idle_directory, "idle", 10 ** 6)
            await_ready(api)
            sqlite_poller = children.child("sqlite_follower", idle_path, 10 ** 6, False)
            await_ready(sqlite_poller)
            peek_idle = children.popen(self.pls(idle_directory, "peek", "idle", "--jsonl"),
                                       stdout=subprocess.PIPE)
            self.await_line(peek_idle, lambda: idle_pool.append_json(b'{"ping": 1}', [], fast))
            followers = {"api": api, "sqlite": sqlite_poller, "peek": peek_idle}
            before = {name: cpu_seconds(process.pid) for name, process in followers.items()}
            time.sleep(idle)
            cpu = {name: 100 * (cpu_seconds(process.pid) - before[name]) / idle
                   for name, process in followers.items()}
            idle_client.close()
        client.close()
        db.close()
        stats = {name: {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "n": len(values)}
                 for name, values in latency.items()}
        poll = "sqlite3 polls every %g ms" % (POLL_INTERVAL * 1000)
        rows = []
        for letter, variant, sqlite_variant, label in (("a", "pls", "sqlite", "API Stream follower"),
                                                       ("c", "pls_peek", "sqlite_print",
                                                        "pls peek --jsonl follower (pipe)")):
            pls, sqlite = stats[variant], stats[sqlite_variant]
            note = "%d msgs at %d/s; %s" % (pls["n"], rate, poll)
            rows.append(row("5" + letter, "wake-up latency p50, " + label, pls["p50"], sqlite["p50"],
                            "ms", "<= 1 ms", pls["p50"] <= 1, note))
            rows.append(row("5" + chr(ord(letter) + 1), "wake-up latency p99, " + label, pls["p99"],
                            sqlite["p99"], "ms", "<= 5 ms", pls["p99"] <= 5, note))
        note = "CPU over %g s of an idle pool; %s" % (idle, poll)
        rows.append(row("5e", "idle follower CPU, API Stream", cpu["api"], cpu["sqlite"], "%core",
                        "<= 1%", cpu["api"] <= 1, note))
        rows.append(row("5f", "idle follower CPU, pls peek", cpu["peek"], cpu["sqlite"], "%core",
                        "<= 1%", cpu["peek"] <= 1, note))
        return rows

    def await_line(self, process, ping, patience=30.0):
        """Ping a pool until a line-printing follower shows it is following."""
        got = threading.Event()
        reader = threading.Thread(target=lambda: (process.stdout.readline(), got.set()), daemon=True)
        reader.start()
        deadline = time.monotonic() + patience
        while not got.wait(0.05):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("follower %s never printed" % process.args[:4])
            ping()
        reader.join()

    def stamp_lines(self, process, writer, count) -> list:
        """Latencies (ms) of the `count` paced messages a follower prints."""
        latencies = []
        watchdog = threading.Timer(count / 100 + 30, process.kill)
        watchdog.start()
        try:
            while len(latencies) < count:
                line = process.stdout.readline()
                arrived = time.time_ns()
                if not line:
                    raise RuntimeError("follower ended after %d of %d messages" % (len(latencies), count))
                sent = json.loads(line)["data"].get("sent_ns")
                if sent is not None:
                    latencies.append((arrived - sent) / 1e6)
        finally:
            watchdog.cancel()
        result_of(writer)
        return latencies

    def row6_startup(self):
        runs = 5 if self.options.quick else 20
        rows = []
        client, directory, path = self.fresh()
        client.create_pool("bench", 1024 * 1024)
        sqlite_open(path).close()
        insert_one = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
                      "db.execute('PRAGMA journal_mode=WAL'); db.execute('PRAGMA synchronous=NORMAL'); "
                      "db.execute(%r, (time.time_ns(), '[]', '{\"a\":1}'))" % INSERT)
        for letter, python in zip("abcdef", pythons()):
            if python.startswith("missing:"):
                rows.append(row("6" + letter, "start-up, %s" % python[8:], None, None, "ms", "<= 2x pass", None,
                                "not installed, skipped"))
                continue
            version = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                                     stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
            commands = {"pass": [python, "-c", "pass"],
                        "version": [python, self.pyz, "version"],
                        "poke": [python, self.pyz, "--dir", directory, "poke", "bench", '{"a":1}'],
                        "sqlite": [python, "-c", insert_one, path]}
            times = {name: [] for name in commands}
            for _ in range(runs):   # interleaved, so noise hits all commands alike
                for name, command in commands.items():
                    seconds, code = wall_time(command)
                    if code != 0:
                        raise RuntimeError("%s exited %d" % (command, code))
                    times[name].append(seconds * 1000)
            ms = {name: statistics.median(values) for name, values in times.items()}
            multiple = ms["poke"] / ms["pass"]
            rows.append(row("6" + letter, "start-up, Python %s: pls.pyz poke (vs sqlite3 insert)" % version,
                            ms["poke"], ms["sqlite"], "ms", "<= 2x pass: %.2fx" % multiple, multiple <= 2,
                            "median of %d; python -c pass %.1f ms; pls.pyz version %.1f ms (%.2fx)"
                            % (runs, ms["pass"], ms["version"], ms["version"] / ms["pass"]), median_ms=ms))
        client.close()
        return rows

    def row7_http(self):
        appends = 1000 if self.options.quick else 10000
        budget = 3.0 if self.options.quick else 15.0
        tailed = 5000 if self.options.quick else 100000
        client, directory, _ = self.fresh()
        client.create_pool("bench", POOL_SIZE)
        self.fill(client.create_pool("tail", POOL_SIZE), tailed)
        client.close()
        port = free_port()
        with Children() as children:
            server = children.popen(self.pls(directory, "serve", "--bind", "127.0.0.1:%d" % port),
                                    stdout=subprocess.DEVNULL)
            wait_for_http(port, server)
            append_rate, done, reused = self.http_appends(port, appends, budget)
            tail_rate = self.http_tail(port, tailed)
            server.terminate()
            server.wait(timeout=15)
        return [row("7a", "HTTP append, one keep-alive connection", append_rate, None, "msg/s", "", None,
                    "%d POST /v0/pools/bench/append (at most %d or %g s); connection reused: %s"
                    % (done, appends, budget, reused)),
                row("7b", "HTTP JSONL tail stream", tail_rate, None, "msg/s", "", None,
                    "%d pre-filled messages, one GET .../tail?since_seq=1&max=N" % tailed)]

    def http_appends(self, port, count, budget) -> tuple:
        """Appends/s over one connection: `count` requests or `budget` seconds, whichever comes first."""
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        bodies = [b'{"data": %s, "tags": ["orders"]}' % message(i) for i in range(count)]
        headers = {"Content-Type": "application/json"}
        reused = True
        started = time.perf_counter()
        deadline = started + budget
        for done, body in enumerate(bodies, 1):
            connection.request("POST", "/v0/pools/bench/append", body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError("append: HTTP %d" % response.status)
            reused = reused and not response.will_close
            if time.perf_counter() > deadline:
                break
        rate = done / (time.perf_counter() - started)
        connection.close()
        return rate, done, reused

    def http_tail(self, port, count) -> float:
        """Messages/s through one JSONL tail stream, read from a raw socket (chunked framing)."""
        request = ("GET /v0/pools/tail/tail?since_seq=1&max=%d&timeout_ms=30000 HTTP/1.1\r\n"
                   "Host: 127.0.0.1\r\nConnection: close\r\n\r\n" % count).encode()
        lines, tail, last = 0, b"", b""
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(request)
            while True:
                chunk = connection.recv(1 << 20)
                if not chunk:
                    break
                lines += (tail + chunk).count(b"}\n")   # a message line ends "}\n"; framing lines "\r\n"
                tail = chunk[-1:]
                last = (last + chunk)[-7:]
                if last == b"\r\n0\r\n\r\n":
                    break
        seconds = time.perf_counter() - started
        if lines != count:
            raise RuntimeError("tail stream delivered %d of %d messages" % (lines, count))
        return count / seconds

    def row8_memory(self):
        quick = self.options.quick
        pool_size = 64 * MB if quick else 1024 * MB
        message_size = 1000000
        big = 10 * 1000 * 1000 if quick else 100 * 1000 * 1000
        client, directory, _ = self.fresh()
        pool = client.create_pool("big", pool_size)
        fast = self.plasmite.Durability.FAST
        pool.append_json(b'{"blob": "' + b"x" * message_size + b'"}', ["big"], fast)
        payload = pool.get_lite3(1).payload
        count = int(pool_size * 0.93) // (message_size + 256)
        for _ in range(count - 1):
            pool.append_lite3(payload, fast)
        client.close()
        with Children() as children:
            follow = result_of(children.child("rss_follower", directory, "big"))
            copies = result_of(children.child("big_message", directory, "huge", big))
        before, after = follow["before"], follow["after"]
        anon = (after["RssAnon"] - before["RssAnon"]) / MB
        return [
            row("8a", "follow a %d MiB pool: RssAnon growth" % (pool_size // MB), anon, None, "MB",
                "<= 16 MB", anon <= 16 and follow["count"] == count,
                "%d msgs of 1 MB read; VmRSS %.0f -> %.0f MB, RssFile %.0f -> %.0f MB (mapped pages), "
                "peak VmHWM %.0f MB" % (follow["count"], before["VmRSS"] / MB, after["VmRSS"] / MB,
                                        before["RssFile"] / MB, after["RssFile"] / MB, after["VmHWM"] / MB),
                **follow),
            row("8b", "%d MB message: get_json peak" % (big // 1000000), copies["get_json"]["copies"], None,
                "copies", "<= 2 copies", copies["get_json"]["copies"] <= 2,
                "peak RSS above baseline minus mapped pages / size; get_lite3 %.2f copies, append_json "
                "%.2f copies; get_json %.2f s, append %.2f s%s"
                % (copies["get_lite3"]["copies"], copies["append"]["copies"], copies["get_json"]["seconds"],
                   copies["append"]["seconds"],
                   "" if copies["get_json"]["exact_peak"] else " (VmHWM not resettable: peak is an upper bound)"),
                **copies)]


def wait_for_http(port, server, patience=30.0):
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("pls serve exited %d" % server.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if probe.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("pls serve did not answer /healthz")


def pythons() -> list:
    """The running Python, then pyenv's 3.8.x and 3.13.x ("missing:NAME" when absent)."""
    import glob
    try:
        root = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        root = os.path.expanduser("~/.pyenv")
    found = [sys.executable]
    for minor in ("3.8", "3.13"):
        candidates = sorted(glob.glob(os.path.join(root, "versions", minor + ".*", "bin", "python" + minor)))
        if not candidates:
            found.append("missing:python" + minor)
        elif os.path.realpath(candidates[-1]) != os.path.realpath(sys.executable):
            found.append(candidates[-1])
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- output -----------------------------------------------------------------------

def format_value(value, unit) -> str:
    if value is None:
        return "n.a."
    if unit == "msg/s":
        return "%.1fk msg/s" % (value / 1000) if value >= 1000 else "%.0f msg/s" % value
    if unit == "%core":
        return "%.2f %%" % value
    return "%.2f %s" % (value, unit)


def print_table(rows) -> None:
    header = ("row", "workload", "plasmite.py", "sqlite3", "ratio", "target", "met?")
    table = [header] + [(r["row"], r["workload"], format_value(r["pls"], r["unit"]),
                         format_value(r["sqlite"], r["unit"]),
                         "n.a." if r["ratio"] is None else "%.2f" % r["ratio"], r["target"] or "-",
                         {True: "yes", False: "no", None: "n.a."}[r["met"]]) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
    print("ratio = plasmite.py / sqlite3 (rates: higher is better; ms, CPU, memory: lower is better)")
    for r in rows:
        if r["note"]:
            print("%-3s %s" % (r["row"], r["note"]))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        CHILD_MODES[sys.argv[2]](*json.loads(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions per row (default 3, quick 1)")
    parser.add_argument("--only", default="", help="comma-separated rows to run, e.g. 1,3")
    parser.add_argument("--pyz", default=os.path.join(ROOT, "dist", "pls.pyz"),
                        help="the zipapp to run (default dist/pls.pyz, built when missing)")
    parser.add_argument("--json", help="write the raw numbers to this file")
    options = parser.parse_args()
    if options.repeat is None:
        options.repeat = 1 if options.quick else 3
    only = {int(part) for part in options.only.split(",") if part.strip()}
    default_pyz = os.path.join(ROOT, "dist", "pls.pyz")
    if not os.path.exists(options.pyz):
        if os.path.abspath(options.pyz) != default_pyz:
            parser.error("no such file: %s" % options.pyz)
        subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py")], check=True)
    options.pyz = os.path.abspath(options.pyz)
    plasmite = import_plasmite()
    print("plasmite.py vs sqlite3%s, %s" % (" (--quick)" if options.quick else "",
                                            datetime.datetime.now().isoformat(" ", "seconds")))
    print("Python %s (%s), sqlite %s, repeat %d" % (platform.python_version(), sys.executable,
                                                  sqlite3.sqlite_version, options.repeat))
    print("machine: %s, %d cores (%s)" % (platform.platform(), os.cpu_count(), cpu_model()))
    print("pls.pyz %s; plasmite %s" % (options.pyz, plasmite.__file__))
    if os.path.getmtime(options.pyz) < os.path.getmtime(os.path.join(ROOT, "plasmite.py")):
        print("WARNING: %s is older than plasmite.py; rebuild it with build_pyz.py" % options.pyz)
    sys.stdout.flush()
    scratch = tempfile.mkdtemp(prefix="plasmite-bench-")
    bench = Bench(options, plasmite, scratch)
    workloads = [bench.row1_append, bench.row2_writers, bench.row3_ingest, bench.row4_read,
                 bench.row5_latency, bench.row6_startup, bench.row7_http, bench.row8_memory]
    rows, failed = [], 0
    try:
        for number, workload in enumerate(workloads, 1):
            if only and number not in only:
                continue
            started = time.monotonic()
            try:
                rows.extend(workload())
            except Exception as error:  # report the row as failed and go on with the others
                failed += 1
                traceback.print_exc()
                rows.append(row(number, workload.__name__, None, None, "", "", False,
                                "FAILED: %s: %s" % (type(error).__name__, error)))
            print("  row %d done in %.0f s" % (number, time.monotonic() - started), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print_table(rows)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"python": platform.python_version(), "cores": os.cpu_count(),
                       "date": datetime.datetime.now().isoformat(), "quick": options.quick,
                       "repeat": options.repeat, "rows": rows}, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
