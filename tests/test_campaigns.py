"""Reliability campaigns (issue 6, items 1 and 2): killed writers, and a concurrency soak.

Both tests are marked ``campaign``: CI runs them once, on the default python3.

Crash campaign (test_crash_campaign): writers are killed with SIGKILL at
random moments, one writer at a time.  Half the writers are API processes
(forked; killed during start-up, mid-append or idle after their records),
half real ``pls.pyz poke POOL`` processes fed JSON lines on stdin by the test
(killed during start-up, mid-ingest, or between records, sometimes with half
a line sent).  After every kill the pool must open, every visible message
must decode and hold exactly what its writer sent (payloads are
self-describing: writer id, counter, a pad whose length depends on both),
seqs must be contiguous, ``diagnose_pool`` must report OK (``pls doctor``
too, every 25 kills and at the end) and the next append must get newest+1.
Two followers read throughout (``pls peek --jsonl`` and an API Stream in a
child process); the test lets them catch up before each new writer and a
writer sends fewer records than the ring holds, so they are never lapped:
each must see every committed message once, in order, with no drops.

Soak (test_concurrency_soak): 4 writers (2 API processes, 2 ``pls poke
--retry 5`` processes fed stdin) and 4 followers (2 API Stream processes, 2
``pls peek --jsonl``) on a 96 KiB pool that wraps many times.  Every writer
reports the seq of each of its appends: together they must be exactly
2..newest, each writer's increasing.  Each follower must see strictly
increasing seqs, each holding what its writer appended under that seq; the
Stream's ``dropped_count`` must equal the gaps it skipped at every message;
peek's drop notices must cover exactly the gaps in its output (merged
notices over-count by the messages delivered between the merged gaps, an
upstream quirk kept on purpose, spec/cli.md 4); after the writers stop every
follower must reach the newest seq within a bound; the final pool validates.

Environment variables:
  PLASMITE_KILLS         writers killed in the crash campaign (default 200; 2000 by hand)
  PLASMITE_SOAK_SECONDS  how long the soak's writers run (default 10; 60 by hand)
  PLASMITE_SEED          seed of every random choice (default 6); in every failure message
"""

import bisect
import inspect
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from array import array

import pytest

import plasmite
from conftest import ROOT

SEED = int(os.environ.get("PLASMITE_SEED", "6"))
KILLS = int(os.environ.get("PLASMITE_KILLS", "200"))
SOAK_SECONDS = float(os.environ.get("PLASMITE_SOAK_SECONDS", "10"))
CATCH_UP_SECONDS = 60  # generous: the machine is a shared 2-core VM


def record(writer: int, number: int) -> dict:
    """The data of message ``number`` of ``writer``: its pad length depends on both.

    The soak's writer script runs this function's source, so both sides agree.
    """
    return {"n": number, "pad": "x" * ((writer * 31 + number * 7) % 61), "w": writer}


# An API follower: prints "<dropped_count> <message JSON>" per message, from seq 1.
API_FOLLOWER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import plasmite
out = sys.stdout.buffer
with plasmite.Client(sys.argv[2]) as client:
    pool = client.open_pool(sys.argv[3])
    with pool.open_stream(since_seq=1, timeout_ms=20) as stream:
        while True:
            raw = stream.next_json()
            if raw is None:  # caught up: show what we have
                out.flush()
                continue
            out.write(b"%d %s\n" % (stream.dropped_count, raw))
"""


class LineCollector:
    """Collects the lines a child writes to a pipe, polled from the test's thread.

    No reader threads: the crash campaign forks, and forking a process that
    runs threads is unsafe.
    """

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        os.set_blocking(self.fd, False)
        self.partial = b""
        self.lines = []
        self.is_eof = False

    def poll(self, timeout: float = 0) -> None:
        """Wait up to ``timeout`` seconds for output, then take every complete line there is."""
        if self.is_eof or not select.select([self.fd], [], [], timeout)[0]:
            return
        chunks = [self.partial]
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                self.is_eof = True
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1
        self.lines.extend(data[:end].splitlines())
        self.partial = data[end:]


class Follower:
    """A follower process (``peek --jsonl`` or the API Stream script) and what it printed.

    ``take()`` parses new lines into (seq, tags, data, dropped_count) items;
    peek has no dropped_count (None): its drops arrive as notices on stderr.
    """

    def __init__(self, name: str, process):
        self.name = name
        self.process = process
        self.is_api = name.startswith("api")
        self.out = LineCollector(process.stdout)
        self.err = LineCollector(process.stderr)
        self.last_seq = 0
        self.checked_seq = 0  # the crash campaign's check has seen every seq up to here

    @classmethod
    def start(cls, name: str, pls, pool_name: str) -> "Follower":
        if name.startswith("api"):
            process = subprocess.Popen(
                [sys.executable, "-c", API_FOLLOWER, ROOT, pls.directory, pool_name],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        else:  # --tail 1 prints seq 1 at once: proof that it reads from the start
            process = pls.popen("peek", pool_name, "--tail", "1", "--jsonl")
        return cls(name, process)

    def take(self) -> list:
        """Poll without waiting; return the messages printed since the last call."""
        self.out.poll()
        self.err.poll()
        items = []
        lines, self.out.lines = self.out.lines, []
        for line in lines:
            if self.is_api:
                dropped, raw = line.split(b" ", 1)
                dropped = int(dropped)
            else:
                dropped, raw = None, line
            message = json.loads(raw)
            items.append((message["seq"], message["meta"]["tags"], message["data"], dropped))
        if items:
            self.last_seq = items[-1][0]
        return items

    def wait_for_seq(self, seq: int, on_items, context: str) -> None:
        """Feed new messages to ``on_items`` until one with ``seq`` arrived; fail if it doesn't."""
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while True:
            on_items(self.take())
            if self.last_seq >= seq:
                return
            assert self.process.poll() is None, "%s: follower exited (%s); stderr: %r" % (
                context, self.process.returncode, self.err.lines[-5:])
            assert time.monotonic() < deadline, (
                "%s: follower %s stuck at seq %d, waiting for %d" % (
                    context, self.name, self.last_seq, seq))
            self.out.poll(0.05)

    def notices(self) -> list:
        """The notices and errors peek printed on stderr so far, parsed."""
        self.err.poll()
        return [json.loads(line) for line in self.err.lines]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self.process.stdout.close()
        self.process.stderr.close()


def read_until(collector: LineCollector, count: int, seconds: float) -> None:
    """Poll ``collector`` until it holds ``count`` lines, EOF, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while len(collector.lines) < count and not collector.is_eof:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        collector.poll(remaining)


# =============================================================================
# Crash campaign
# =============================================================================

CRASH_POOL = "crash"
CRASH_POOL_SIZE = 512 * 1024  # about 950 of these messages (each takes 528-592 bytes)
MAX_RECORDS_PER_WRITER = 300  # well under what the ring holds, so followers are never lapped
API_VARIANTS = ("api-startup", "api-running", "api-raw")
POKE_VARIANTS = ("poke-startup", "poke-ingest", "poke-between")


class Ledger:
    """What each seq of the crash campaign must hold: runs of one writer's records, and markers.

    A run starts at a seq and holds ``record(writer, seq - start)``; a marker
    run (the test's own append after a kill) holds ``{"after": kill}``.
    """

    def __init__(self):
        self.starts = []
        self.runs = []

    def begin(self, first_seq: int, writer: int, tag: str) -> None:
        self.starts.append(first_seq)
        self.runs.append((first_seq, writer, tag))

    def expected(self, seq: int) -> tuple:
        """Return (tags, data) that message ``seq`` must have."""
        first_seq, writer, tag = self.runs[bisect.bisect_right(self.starts, seq) - 1]
        if tag == "after":
            return ["after"], {"after": writer}
        return [tag], record(writer, seq - first_seq)

    def origin(self, seq: int) -> str:
        first_seq, writer, tag = self.runs[bisect.bisect_right(self.starts, seq) - 1]
        return "%s %d (run from seq %d)" % (tag, writer, first_seq)


def fork_api_writer(directory: str, writer: int, limit: int, is_raw: bool):
    """Fork an API writer appending ``limit`` records, then idling; return (pid, status fd).

    It appends with ``Pool.append_json``, or, when ``is_raw``, encodes its
    records first and appends them with ``LocalPool.append`` (the storage
    layer under the API): that loop spends most of its time inside the
    append, so more kills land between its stores.  The child writes b"r"
    when about to append, b"d" after its records, and b"e" plus a
    traceback if anything fails (then exits 1).
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            with plasmite.Client(directory) as client:
                pool = client.open_pool(CRASH_POOL)
                if is_raw:
                    payloads = [plasmite.encode_message(["api"], record(writer, number))
                                for number in range(limit)]
                    append = pool._local().append
                    os.write(write_fd, b"r")
                    for payload in payloads:
                        append(payload)
                else:
                    os.write(write_fd, b"r")
                    for number in range(limit):
                        pool.append_json(json.dumps(record(writer, number)), ["api"])
                os.write(write_fd, b"d")
                time.sleep(3600)  # killed between records
        except BaseException:
            os.write(write_fd, b"e" + traceback.format_exc().encode())
        finally:
            os._exit(1)
    os.close(write_fd)
    return child, read_fd


def read_all(fd: int) -> bytes:
    """Read a pipe to EOF (its writer is dead) and close it."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


def run_api_writer(directory, writer, variant, generator, context) -> int:
    """Run and kill one API writer; return how many records it was given."""
    limit = generator.randint(1, MAX_RECORDS_PER_WRITER)
    child, status_fd = fork_api_writer(directory, writer, limit, variant == "api-raw")
    if variant == "api-startup":  # while opening the pool or in the first appends
        time.sleep(generator.random() * 0.003)
    else:
        assert select.select([status_fd], [], [], 30)[0], "%s: writer never started" % context
        # Up to about as long as its appends take (measured here: 35 us each, 7 us raw),
        # so most kills land while it appends.
        per_append = 35e-6 if variant == "api-running" else 7e-6
        time.sleep(generator.random() * limit * per_append)
    os.kill(child, signal.SIGKILL)
    _, wait_status = os.waitpid(child, 0)
    report = read_all(status_fd)
    assert os.WIFSIGNALED(wait_status), "%s: the writer failed before the kill:\n%s" % (
        context, report.decode(errors="replace"))
    return limit


def run_poke_writer(pls, writer, first_seq, variant, generator, context) -> int:
    """Run and kill one ``pls poke`` fed records on stdin; return how many it was sent.

    Checks the receipts poke printed before the kill: each names the seq
    the ledger expects and echoes the record.
    """
    count = generator.randint(1, MAX_RECORDS_PER_WRITER)
    lines = b"".join(json.dumps(record(writer, number)).encode() + b"\n"
                     for number in range(count))
    # Auto-detection waits for 8 lines (or EOF) before it ingests anything.
    options = ["-i", "jsonl"] if count < 8 else []
    process = pls.popen("poke", CRASH_POOL, "--tag", "poke", *options, stdin=subprocess.PIPE)
    receipts = LineCollector(process.stdout)
    if variant == "poke-between":
        if generator.random() < 0.5:  # and half of the next line
            lines += json.dumps(record(writer, count)).encode()[:generator.randint(1, 20)]
    process.stdin.write(lines)  # under 64 KiB: never blocks on the pipe
    process.stdin.flush()
    if variant == "poke-startup":  # start-up takes about 0.1 s
        time.sleep(generator.random() * 0.2)
    elif variant == "poke-ingest":
        read_until(receipts, 1, 30)
        time.sleep(generator.random() * 0.01)
    else:
        read_until(receipts, count, 30)  # all appended: poke waits for more input
        assert len(receipts.lines) == count, "%s: poke printed %d of %d receipts; stderr %r" % (
            context, len(receipts.lines), count, process.stderr.read())
    process.kill()
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "%s: poke ended by itself (%s): %r" % (
        context, process.returncode, process.stderr.read())
    read_until(receipts, count + 1, 30)
    for number, line in enumerate(receipts.lines):
        receipt = json.loads(line)
        assert (receipt["seq"], receipt["data"]) == (first_seq + number, record(writer, number)), (
            "%s: receipt %d" % (context, number))
    process.stdin.close()
    process.stdout.close()
    process.stderr.close()
    return count


def kill_moment(local, newest: int, warnings: list) -> str:
    """Name what a kill interrupted, as far as the file shows it (for the campaign's summary)."""
    if plasmite.INTERRUPTED_APPEND_WARNING in warnings:
        return "publishing"
    view = local._view_after_wrap(local.read_state()[0])[0]
    if view.seq == newest + 1 and view.found == plasmite.FOUND_PENDING:
        return "writing a frame"
    if view.seq == newest + 1 and view.found == plasmite.FOUND_MESSAGE:
        return "committed, unpublished"
    return "between appends"


def check_pool_after_kill(path, ledger, previous_newest, sent, context) -> tuple:
    """Check the invariants a killed writer must leave intact; return (oldest, newest, kill moment).

    The pool opens and diagnoses OK; every visible message decodes to what
    the ledger says; the seqs are contiguous; the writer committed at most
    ``sent`` messages after ``previous_newest``.
    """
    report = plasmite.diagnose_pool(path, CRASH_POOL)
    assert report["status"] == "ok", "%s: %r" % (context, report)
    with plasmite.LocalPool.open(path) as local:
        bounds = local.bounds()
        assert bounds is not None, "%s: the pool is empty" % context
        oldest, newest = bounds
        assert previous_newest <= newest <= previous_newest + sent, (
            "%s: newest %d, expected %d..%d" % (context, newest, previous_newest,
                                                previous_newest + sent))
        assert report["last_good_seq"] == newest, "%s: %r" % (context, report)
        cursor = local.cursor(oldest)
        for seq in range(oldest, newest + 1):
            frame = cursor.next_frame()
            assert frame is not None and frame.seq == seq, "%s: walk stopped at %d of %d..%d" % (
                context, seq, oldest, newest)
            message = plasmite.message_fields(frame)
            assert (message["meta"]["tags"], message["data"]) == ledger.expected(seq), (
                "%s: seq %d from %s holds %r" % (context, seq, ledger.origin(seq), message))
        assert cursor.next_frame() is None and cursor.dropped_count == 0, context
        return oldest, newest, kill_moment(local, newest, report["remediation_hints"])


def check_follower_items(follower, items, ledger, context) -> None:
    """Every message exactly once and in order (``checked_seq`` + 1 on), as the ledger says."""
    for seq, tags, data, dropped in items:
        assert seq == follower.checked_seq + 1, (
            "%s: follower %s read seq %d after %d (dropped count %s); the pool was not lapped"
            % (context, follower.name, seq, follower.checked_seq, dropped))
        assert (tags, data) == ledger.expected(seq), "%s: follower %s: seq %d from %s is %r %r" % (
            context, follower.name, seq, ledger.origin(seq), tags, data)
        assert dropped in (None, 0), "%s: follower %s dropped %d" % (context, follower.name,
                                                                     dropped)
        follower.checked_seq = seq


@pytest.mark.campaign
def test_crash_campaign(pls):
    generator = random.Random(SEED)
    directory = pls.directory
    path = plasmite.resolve_pool_path(directory, CRASH_POOL)
    ledger = Ledger()
    counts = {variant: 0 for variant in API_VARIANTS + POKE_VARIANTS}
    moments = {}
    committed = 0
    started = time.monotonic()
    with plasmite.Client(directory) as client:
        pool = client.create_pool(CRASH_POOL, CRASH_POOL_SIZE)
        newest = plasmite.parse_message(pool.append_json('{"after": 0}', ["after"]))["seq"]
        ledger.begin(newest, 0, "after")
        followers = [Follower.start(name, pls, CRASH_POOL) for name in ("peek", "api-stream")]
        try:
            for follower in followers:
                follower.wait_for_seq(1, lambda items: check_follower_items(
                    follower, items, ledger, "start (seed %d)" % SEED), "start")
            for kill in range(1, KILLS + 1):
                variant = generator.choice(API_VARIANTS if kill % 2 else POKE_VARIANTS)
                counts[variant] += 1
                context = "seed %d, kill %d (%s)" % (SEED, kill, variant)
                ledger.begin(newest + 1, kill, variant.split("-")[0])
                if variant in API_VARIANTS:
                    sent = run_api_writer(directory, kill, variant, generator, context)
                else:
                    sent = run_poke_writer(pls, kill, newest + 1, variant, generator, context)
                previous_newest = newest
                oldest, newest, moment = check_pool_after_kill(path, ledger, newest, sent,
                                                               context)
                committed += newest - previous_newest
                moments[moment] = moments.get(moment, 0) + 1
                receipt = plasmite.parse_message(
                    pool.append_json(json.dumps({"after": kill}), ["after"]))
                assert receipt["seq"] == newest + 1, "%s: next append got %r" % (context, receipt)
                # It makes room for one small frame: at most two frames and a wrap gap go.
                bounds = pool._local().bounds()
                assert bounds[0] <= oldest + 3, "%s: the next append evicted %d..%d" % (
                    context, oldest, bounds[0] - 1)
                newest += 1
                ledger.begin(newest, kill, "after")
                if kill % 25 == 0 or kill == KILLS:
                    report = pls.json("doctor", CRASH_POOL)["reports"][0]
                    assert report["status"] == "ok", "%s: pls doctor: %r" % (context, report)
                for follower in followers:
                    follower.wait_for_seq(newest, lambda items: check_follower_items(
                        follower, items, ledger, context), context)
            for follower in followers:
                assert follower.notices() == [], "seed %d: %s printed %r" % (
                    SEED, follower.name, follower.notices())
        finally:
            for follower in followers:
                follower.stop()
    print("crash campaign: seed %d, %d kills %r, killed while %r, %d messages committed by "
          "writers, newest seq %d, %.1f s" % (SEED, KILLS, counts, moments, committed, newest,
                                              time.monotonic() - started))
    assert committed > KILLS  # the kills did not all land before the first append


# =============================================================================
# Concurrency soak
# =============================================================================

SOAK_POOL = "soak"
SOAK_POOL_SIZE = 96 * 1024
API_WRITERS = (0, 1)
POKE_WRITERS = (2, 3)

# An API writer: appends bursts of records for a while, then prints the seq of each.
API_WRITER = inspect.getsource(record) + r"""
import json, random, sys, time
sys.path.insert(0, sys.argv[1])
import plasmite
writer, seed, seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
generator = random.Random(seed * 100 + writer)
seqs = []
with plasmite.Client(sys.argv[2]) as client:
    pool = client.open_pool(sys.argv[3])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(generator.randint(1, 30)):
            receipt = pool.append_json(json.dumps(record(writer, len(seqs))), ["api"])
            seqs.append(plasmite.parse_message(receipt)["seq"])
        time.sleep(generator.random() * 0.005)
print(json.dumps(seqs))
"""


def feed_poke(process, writer: int, seconds: float, sent: list) -> None:
    """Write bursts of records to a poke's stdin for ``seconds``, then close it."""
    generator = random.Random(SEED * 100 + writer)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            burst = generator.randint(1, 30)
            process.stdin.write(b"".join(
                json.dumps(record(writer, sent[0] + number)).encode() + b"\n"
                for number in range(burst)))
            process.stdin.flush()
            sent[0] += burst
            time.sleep(generator.random() * 0.005)
    finally:
        process.stdin.close()


def check_peek_drops(follower, seqs, context) -> None:
    """Peek's drop notices cover exactly the gaps in its output, one notice per run of gaps."""
    gaps = [(seqs[i - 1], seqs[i]) for i in range(1, len(seqs)) if seqs[i] > seqs[i - 1] + 1]
    # Notices are rate-limited (one a second): wait for the one that covers the last gap.
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while gaps and time.monotonic() < deadline and not any(
            entry.get("notice", {}).get("details", {}).get("next_seen_seq") == gaps[-1][1]
            for entry in follower.notices()):
        follower.err.poll(0.1)
    entries = follower.notices()
    assert all(entry.get("notice", {}).get("kind") == "drop" for entry in entries), (
        "%s: %r" % (context, entries))
    notices = [entry["notice"] for entry in entries]
    position = 0
    for notice in notices:
        details = notice["details"]
        last_seen, next_seen = details["last_seen_seq"], details["next_seen_seq"]
        assert details["dropped_count"] == next_seen - last_seen - 1, "%s: %r" % (context, notice)
        covered = []
        while position < len(gaps) and gaps[position][1] <= next_seen:
            covered.append(gaps[position])
            position += 1
        assert covered and covered[0][0] == last_seen and covered[-1][1] == next_seen, (
            "%s: notice %r does not match the gaps %r" % (context, details, covered or gaps[
                position:position + 3]))
    assert position == len(gaps), "%s: gaps without a notice: %r" % (context, gaps[position:][:5])


@pytest.mark.campaign
def test_concurrency_soak(pls):
    context = "seed %d, %.0f s soak" % (SEED, SOAK_SECONDS)
    directory = pls.directory
    path = plasmite.resolve_pool_path(directory, SOAK_POOL)
    with plasmite.Client(directory) as client:
        client.create_pool(SOAK_POOL, SOAK_POOL_SIZE).append_json('{"start": true}', ["start"])
    names = ("api-stream-1", "api-stream-2", "peek-1", "peek-2")
    followers = [Follower.start(name, pls, SOAK_POOL) for name in names]
    seen = {name: (array("q"), array("q"), array("q")) for name in names}  # seq, writer, number

    def collect(follower, items):
        seqs, writers, numbers = seen[follower.name]
        for seq, tags, data, dropped in items:
            assert not seqs or seq > seqs[-1], "%s: follower %s read seq %d after %d" % (
                context, follower.name, seq, seqs[-1])
            if dropped is not None:  # the Stream counted exactly the seqs it skipped
                assert dropped == seq - 1 - len(seqs), "%s: %s at seq %d: dropped %d, missed %d" % (
                    context, follower.name, seq, dropped, seq - 1 - len(seqs))
            if seq == 1:
                assert (tags, data) == (["start"], {"start": True}), context
                writer = number = -1
            else:
                writer, number = data["w"], data["n"]
                assert data == record(writer, number), "%s: %s seq %d: %r" % (
                    context, follower.name, seq, data)
            seqs.append(seq)
            writers.append(writer)
            numbers.append(number)

    writers = []
    try:
        for follower in followers:
            follower.wait_for_seq(1, lambda items: collect(follower, items), context)
        for writer in API_WRITERS:
            writers.append(subprocess.Popen(
                [sys.executable, "-c", API_WRITER, ROOT, directory, SOAK_POOL, str(writer),
                 str(SEED), str(SOAK_SECONDS)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        feeders, pokes, poke_sent = [], [], {}
        for writer in POKE_WRITERS:
            process = pls.popen("poke", SOAK_POOL, "--tag", "poke", "--retry", "5",
                                stdin=subprocess.PIPE)
            poke_sent[writer] = [0]
            pokes.append((writer, process, LineCollector(process.stdout)))
            writers.append(process)
            feeders.append(threading.Thread(target=feed_poke, daemon=True,
                                            args=(process, writer, SOAK_SECONDS, poke_sent[writer])))
        for feeder in feeders:
            feeder.start()
        # Writers run; the followers' and pokes' output is taken as it comes.
        # The API writers print their seqs at the end (communicate() takes them).
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline or any(
                process.poll() is None for _, process, _ in pokes):
            assert time.monotonic() < deadline + CATCH_UP_SECONDS, "%s: a poke hangs" % context
            for follower in followers:
                collect(follower, follower.take())
            for _, _, receipts in pokes:
                receipts.poll()
            select.select([follower.out.fd for follower in followers], [], [], 0.05)
        for feeder in feeders:
            feeder.join(timeout=30)
        seq_by_writer = {}  # writer -> the seq of each of its messages, in its order
        for writer, process in zip(API_WRITERS, writers):
            out, err = process.communicate(timeout=CATCH_UP_SECONDS)
            assert process.returncode == 0, "%s: API writer %d failed: %s" % (
                context, writer, err.decode(errors="replace"))
            seq_by_writer[writer] = json.loads(out)
        for writer, process, receipts in pokes:
            read_until(receipts, poke_sent[writer][0] + 1, 30)
            err = process.stderr.read()
            assert process.wait(timeout=30) == 0 and err == b"", "%s: poke %d: %d, %r" % (
                context, writer, process.returncode, err)
            assert len(receipts.lines) == poke_sent[writer][0], "%s: poke %d: %d of %d" % (
                context, writer, len(receipts.lines), poke_sent[writer][0])
            seq_by_writer[writer] = []
            for number, line in enumerate(receipts.lines):
                receipt = json.loads(line)
                assert receipt["data"] == record(writer, number), "%s: poke %d receipt %d" % (
                    context, writer, number)
                seq_by_writer[writer].append(receipt["seq"])
        with plasmite.LocalPool.open(path) as local:
            oldest, newest = local.bounds()
            issues, last_good, _ = plasmite.validate_pool(local)
            assert issues == [] and last_good == newest, "%s: %r" % (context, issues)
        # Every append got its own seq: together exactly 2..newest, each writer's increasing.
        owner = {}
        for writer, seqs in seq_by_writer.items():
            assert all(a < b for a, b in zip(seqs, seqs[1:])), "%s: writer %d out of order" % (
                context, writer)
            owner.update((seq, (writer, number)) for number, seq in enumerate(seqs))
        assert sorted(owner) == list(range(2, newest + 1)), "%s: %d writer seqs for 2..%d" % (
            context, len(owner), newest)
        # No follower hangs: each reaches the newest seq.
        for follower in followers:
            follower.wait_for_seq(newest, lambda items: collect(follower, items), context)
        for follower in followers:
            seqs, writer_ids, numbers = seen[follower.name]
            label = "%s, follower %s" % (context, follower.name)
            assert seqs[-1] == newest, label
            for index in range(1, len(seqs)):
                assert owner[seqs[index]] == (writer_ids[index], numbers[index]), (
                    "%s: seq %d is %r, the writers say %r" % (
                        label, seqs[index], (writer_ids[index], numbers[index]),
                        owner[seqs[index]]))
            if not follower.is_api:
                check_peek_drops(follower, seqs, label)
            print("%s: %d messages read, %d dropped" % (label, len(seqs), newest - len(seqs)))
        with plasmite.LocalPool.open(path) as local:
            cursor = local.cursor(oldest)
            for seq in range(oldest, newest + 1):
                data = plasmite.message_fields(cursor.next_frame())["data"]
                assert owner[seq] == (data["w"], data["n"]), "%s: pool seq %d" % (context, seq)
        report = pls.json("doctor", SOAK_POOL)["reports"][0]
        assert report["status"] == "ok", "%s: pls doctor: %r" % (context, report)
        print("soak: %s, %d messages from %r, ring wrapped about %d times" % (
            context, newest, {writer: len(seqs) for writer, seqs in seq_by_writer.items()},
            newest // (newest - oldest + 1)))
    finally:
        for process in writers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        for follower in followers:
            follower.stop()
