"""Corruption fuzzing (reliability campaign 3): damaged pool files never crash or hang a reader.

Every fixture pool and a few pools written here (wrapped with and without an
index, a three-slot index, large messages) are damaged at random: byte flips
(biased toward the header, index slots, frame headers and commit markers),
"interesting" values stored into header and frame-header fields, zeroed or
randomised ranges, frames copied over other frames, truncation and extension
(with zeros or random bytes).  On each variant the readers (open, info, get,
a cursor over every message as ``peek --tail`` uses, message decoding) and the
doctor (``diagnose_pool``) must:

* end within a time bound (a watchdog kills a worker that stops making
  progress and names the seed and variant);
* return correct data or raise PlasmiteError Corrupt/NotFound, never another
  exception.  Exceptions to that rule, both deliberate: opening raises Usage
  when the version field (bytes 4-8) was damaged, because the file is then a
  pool of a format we do not understand (spec/cli.md 3.4, the doctor's
  "format" issue); nothing raises Io or Busy on a file nobody writes to;
* "correct data": the format has no payload checksum, so every message
  returned must decode to the message shape, seqs from a cursor must increase
  and lie within the header's bounds, and a message whose frame bytes the
  damage did not touch must equal the original message at that seq (byte
  ranges are computed from the undamaged pool).  When the damage touched no
  byte a reader depends on (the header fields, the live frames, the wrap
  markers on the walk, the frame at the head), everything read must equal the
  undamaged pool's reading exactly;
* the doctor flags every file that reading found corrupt: if any read raised
  Corrupt (or opening raised Usage), ``diagnose_pool`` reports ``corrupt``.

A subset of the variants also goes through the real ``pls.pyz`` (``pool info``,
``get``, ``peek --tail N --jsonl --timeout``, ``doctor``): exit codes from the
contract, a JSON error envelope on stderr (never a traceback nor an Internal
error), stdout equal to what the in-process readers returned.

Environment (counts for a run by hand; CI uses the defaults):

  PLASMITE_FUZZ_VARIANTS      damaged variants checked in-process (default 500; 10000 by hand)
  PLASMITE_FUZZ_CLI_VARIANTS  of those, how many also go through the CLI (default 30)
  PLASMITE_SEED               seed of the campaign (default 3); printed, and in every failure
"""

import json
import os
import random
import select
import struct
import subprocess
import sys
import time

import pytest

import plasmite
from conftest import POOL_FIXTURES, ROOT, pool_fixture_names
from plasmite import PlasmiteError

TESTS = os.path.dirname(os.path.abspath(__file__))
SEED = int(os.environ.get("PLASMITE_SEED", "3"))
VARIANTS = int(os.environ.get("PLASMITE_FUZZ_VARIANTS", "500"))
CLI_VARIANTS = int(os.environ.get("PLASMITE_FUZZ_CLI_VARIANTS", "30"))
STALL_SECONDS = 30  # a worker silent this long is hung (one variant takes well under 1 s)
OPERATION_SECONDS = 5  # the bound on one read or doctor call of one variant
HEADER_FIELDS = 104  # bytes of the pool header that carry data (spec/pool-format.md 3)
VERSION_FIELD = (4, 8)


# -- pools written by the test --------------------------------------------------

def sample_data(generator, size):
    """A JSON object of roughly ``size`` bytes with nested values, unicode and numbers."""
    return {"i": generator.randrange(10 ** 6), "f": generator.random() * 1e6, "ok": True,
            "none": None, "nested": {"list": [1, "two", {"three": 3.5}], "empty": {}},
            "text": "ü€😀 " + "x" * max(size - 120, 0)}


def write_pool(path, file_size, index_capacity, count, sizes, seed):
    generator = random.Random(seed)
    with plasmite.LocalPool.create(path, file_size, index_capacity) as pool:
        for number in range(count):
            tags = generator.sample(["a", "b", "ünï", "", "long" * 10], generator.randrange(3))
            payload = plasmite.encode_message(tags, sample_data(generator, generator.choice(sizes)))
            pool.append(payload, timestamp_ns=1_700_000_000_000_000_000 + number * 1_000_003)


WRITTEN_POOLS = {
    # name: (file size, index capacity (None = automatic), messages, data sizes)
    "written_wrapped_index": (64 * 1024, None, 400, (100, 300, 700)),
    "written_wrapped_noindex": (64 * 1024, 0, 400, (100, 300, 700)),
    "written_noindex": (64 * 1024, 0, 25, (50, 200)),
    "written_tiny_index": (32 * 1024, 3, 150, (10, 400, 1500, 3000)),
    "written_large": (256 * 1024, None, 14, (20000, 45000, 60000)),
}


def write_sources(directory):
    """Write the test's own pools into ``directory``; return the paths of every source pool."""
    paths = [os.path.join(POOL_FIXTURES, name + ".plasmite") for name in pool_fixture_names()]
    for number, (name, (file_size, capacity, count, sizes)) in enumerate(sorted(WRITTEN_POOLS.items())):
        path = os.path.join(directory, name + ".plasmite")
        write_pool(path, file_size, capacity, count, sizes, number)
        paths.append(path)
    return paths


# -- what an undamaged pool holds ------------------------------------------------

class Original:
    """An undamaged source pool: its bytes, live frames (seq -> file range and content) and readings."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)
        with open(path, "rb") as handle:
            self.data = handle.read()
        self.frames = {}  # seq -> (start, end, timestamp_ns, payload)
        self.relevant = [(0, HEADER_FIELDS)]  # byte ranges a reader depends on
        self.frame_headers = []  # file offsets of frame headers on the walk (wrap markers too)
        self.index_slots = []
        self.ring_offset = 0
        try:
            pool = plasmite.LocalPool.open(path)
        except PlasmiteError:
            self.readings = None
            return
        with pool:
            self.ring_offset = pool.ring_offset
            self.walk(pool)
            capacity = pool.index_capacity
            state = pool.read_state()
            if state[3]:
                self.index_slots = sorted({plasmite.INDEX_OFFSET + 16 * (seq % capacity)
                                           for seq in range(state[3], state[4] + 1)}
                                          if capacity else ())
            self.readings = read_everything(pool)

    def walk(self, pool):
        """Record the byte ranges of the live frames, the wrap markers and the frame at the head."""
        head, tail, _tail_next, oldest, newest = pool.read_state()
        ring_offset = pool.ring_offset
        offset, seq = tail, oldest
        for _ in range(2 * (newest - oldest + 4) if oldest else 0):
            if seq > newest:
                break
            view = pool.inspect_frame(offset)
            if view.found == plasmite.FOUND_WRAP:
                if pool.ring_size - offset >= plasmite.FRAME_HEADER.size:
                    self.relevant.append((ring_offset + offset, ring_offset + offset + 64))
                    self.frame_headers.append(ring_offset + offset)
                offset = 0
                continue
            if view.found != plasmite.FOUND_MESSAGE or view.seq < seq:
                break
            start = ring_offset + offset
            end = start + plasmite.frame_length(view.payload_length)
            self.relevant.append((start, end))
            self.frame_headers.append(start)
            payload = bytes(pool._copy_payload(offset, view.payload_length))
            self.frames[view.seq] = (start, end, view.timestamp_ns, payload)
            seq = view.seq + 1
            offset = view.next_offset
        if pool.ring_size - head >= plasmite.FRAME_HEADER.size:
            self.relevant.append((ring_offset + head, ring_offset + head + 64))
        if oldest and seq <= newest:
            # A damaged source: readers reach the frames past the damage through the
            # index, so every byte may matter.
            self.relevant = [(0, len(self.data))]


def message_shape_problem(message):
    """Return why a decoded message does not have the message shape, or None."""
    if set(message) != {"data", "meta", "seq", "time"}:
        return "keys %r" % sorted(message)
    if not isinstance(message["meta"], dict) or set(message["meta"]) != {"tags"}:
        return "meta %r" % (message["meta"],)
    tags = message["meta"]["tags"]
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return "tags %r" % (tags,)
    if type(message["seq"]) is not int or message["seq"] < 1:
        return "seq %r" % (message["seq"],)
    if not isinstance(message["time"], str) or not message["time"].endswith("Z"):
        return "time %r" % (message["time"],)
    # Data may be any JSON value in a damaged file (only a writer insists on an object),
    # but it must print as JSON.
    plasmite.dump_json(message)
    return None


def timed(outcome, name, function, *args):
    """Run one reader call; record its result or error kind and how long it took."""
    started = time.monotonic()
    try:
        result = function(*args)
        error = None
    except PlasmiteError as err:
        result, error = None, err
    elapsed = time.monotonic() - started
    if elapsed > OPERATION_SECONDS:
        outcome["failures"].append("%s took %.1f s" % (name, elapsed))
    if error is not None:
        outcome["errors"].append((name, error.kind.value, error.message))
    return result, error


def read_everything(pool):
    """Read a pool the ways the commands do; return comparable readings (no exceptions swallowed
    except PlasmiteError, which is recorded)."""
    outcome = {"failures": [], "errors": []}
    readings = {"gets": {}, "cursor": [], "cursor_error": None, "info": None}
    info, _ = timed(outcome, "info", pool.info, 0)
    if info is not None:
        readings["info"] = plasmite.dump_json(info)
    head, tail, _tail_next, oldest, newest = pool.read_state()
    seqs = {oldest - 1, oldest, newest, newest + 1, (oldest + newest) // 2, 1}
    for seq in sorted(seq for seq in seqs if seq >= 0):
        frame, error = timed(outcome, "get %d" % seq, pool.get, seq)
        if frame is not None:
            message, error = timed(outcome, "decode get %d" % seq, plasmite.message_fields, frame)
            readings["gets"][seq] = ("frame", frame.seq, frame.timestamp_ns, bytes(frame.payload),
                                     message)
        else:
            readings["gets"][seq] = ("error", error.kind.value)
    cursor = pool.cursor(1)
    started = time.monotonic()
    limit = newest - oldest + 2 if oldest else 1
    for _ in range(limit + 8):
        try:
            frame = cursor.next_frame()
        except PlasmiteError as err:
            readings["cursor_error"] = err.kind.value
            outcome["errors"].append(("cursor", err.kind.value, err.message))
            break
        if frame is None:
            break
        message, error = timed(outcome, "decode cursor %d" % frame.seq, plasmite.message_fields,
                               frame)
        readings["cursor"].append((frame.seq, frame.timestamp_ns, bytes(frame.payload), message))
        if error is not None:
            break  # peek stops at a message it cannot decode
    else:
        outcome["failures"].append("cursor did not stop after %d frames" % (limit + 8))
    if time.monotonic() - started > OPERATION_SECONDS:
        outcome["failures"].append("cursor took %.1f s" % (time.monotonic() - started))
    readings["outcome"] = outcome
    readings["bounds"] = (oldest, newest)
    return readings


# -- damage -------------------------------------------------------------------------

INTERESTING = (0, 1, 2, 7, 8, 63, 64, 65, 4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFFFFFFFFFFF, 0x8000000000000000, 2 ** 32, 2 ** 40)


def pick_range(generator, original, size):
    """Choose a target byte range, biased toward the structures a reader trusts."""
    data_length = len(original.data)
    choice = generator.random()
    if choice < 0.2:
        start = generator.randrange(HEADER_FIELDS)
        return start, min(start + generator.randint(1, 8), HEADER_FIELDS)
    if choice < 0.45 and original.frame_headers:
        start = generator.choice(original.frame_headers) + generator.randrange(48)
        return start, start + generator.randint(1, 16)
    if choice < 0.55 and original.frames:
        _start, end, _timestamp, _payload = original.frames[generator.choice(list(original.frames))]
        start = generator.randrange(max(end - 16, 0), end)
        return start, min(start + generator.randint(1, 8), end)
    if choice < 0.62 and original.index_slots:
        start = generator.choice(original.index_slots) + generator.randrange(16)
        return start, start + generator.randint(1, 8)
    if choice < 0.8 and original.frames:
        start, end, _timestamp, _payload = original.frames[generator.choice(list(original.frames))]
        start = generator.randrange(start + 64, end)
        return start, min(start + generator.randint(1, size), end)
    start = generator.randrange(data_length)
    return start, min(start + generator.randint(1, size), data_length)


def damage(generator, original):
    """Return (damaged bytes, touched ranges, description) for one random variant."""
    data = bytearray(original.data)
    touched = []
    steps = []
    for _ in range(generator.choice((1, 1, 1, 2, 3))):
        kind = generator.choice(("flip", "flip", "flip", "value", "value", "zero", "random",
                                 "copy", "truncate", "extend"))
        if kind == "flip":
            start, end = pick_range(generator, original, 8)
            for offset in range(start, end):
                if generator.random() < 0.5:
                    data[offset] ^= 1 << generator.randrange(8)
                else:
                    data[offset] ^= generator.randrange(1, 256)
        elif kind == "value":
            start, _end = pick_range(generator, original, 8)
            width = generator.choice((4, 8))
            start -= start % width
            end = start + width
            base = generator.choice(INTERESTING + (len(data), len(data) - original.ring_offset,
                                                   start))
            value = (base + generator.choice((0, 0, 1, -1, 8, -8, 64))) % (1 << (8 * width))
            data[start:end] = value.to_bytes(width, "little")
        elif kind == "zero":
            start, end = pick_range(generator, original, generator.choice((8, 64, 4096)))
            data[start:end] = bytes(end - start)
        elif kind == "random":
            start, end = pick_range(generator, original, generator.choice((8, 64, 600)))
            data[start:end] = bytes(generator.randrange(256) for _ in range(end - start))
        elif kind == "copy":
            if len(original.frame_headers) < 2:
                continue
            source, start = generator.sample(original.frame_headers, 2)
            length = generator.choice((64, 128, 512, 2048))
            length = min(length, len(data) - source, len(data) - start)
            data[start:start + length] = original.data[source:source + length]
            end = start + length
        elif kind == "truncate":
            length = generator.choice((0, 1, 103, 104, 4095, 4096, 4104, original.ring_offset,
                                       len(data) - 1, len(data) - 8,
                                       generator.randrange(len(data))))
            start, end = length, len(data)
            del data[length:]
        else:
            extra = generator.choice((1, 8, 4096, 65536))
            filler = (bytes(extra) if generator.random() < 0.5
                      else bytes(generator.randrange(256) for _ in range(extra)))
            start, end = len(data), len(data) + extra
            data += filler
        touched.append((start, end))
        steps.append("%s %d..%d" % (kind, start, end))
        if kind in ("truncate", "extend"):
            break  # ranges picked later would refer to the original length
    return bytes(data), touched, "; ".join(steps)


def overlaps(ranges, touched):
    return any(start < touched_end and touched_start < end
               for start, end in ranges for touched_start, touched_end in touched)


# -- checking one variant ------------------------------------------------------------

ALLOWED_READ_KINDS = {"Corrupt", "NotFound"}


def check_variant(original, data, touched, path):
    """Check every reader on one damaged file; return (failures, facts) where facts summarise
    what was read (for the CLI cross-check and the campaign counters)."""
    failures = []
    with open(path, "wb") as handle:
        handle.write(data)
    size_changed = len(data) != len(original.data)
    facts = {"open": None, "doctor": None, "read_corrupt": False}
    started = time.monotonic()
    try:
        pool = plasmite.LocalPool.open(path)
    except PlasmiteError as err:
        pool = None
        facts["open"] = err.kind.value
        if err.kind == "Usage":
            if not (err.message.startswith("unsupported pool format version")
                    and overlaps([VERSION_FIELD], touched)):
                failures.append("open raised Usage %r" % err.message)
        elif err.kind != "Corrupt":
            failures.append("open raised %s %r" % (err.kind.value, err.message))
        facts["read_corrupt"] = True
    except Exception as err:  # the bug this campaign looks for
        return ["open raised %s: %s" % (type(err).__name__, err)], facts
    if time.monotonic() - started > OPERATION_SECONDS:
        failures.append("open took too long")
    if pool is not None:
        if size_changed:
            failures.append("a file of the wrong size opened")
        try:
            with pool:
                readings = read_everything(pool)
        except Exception as err:
            return failures + ["reading raised %s: %s" % (type(err).__name__, err)], facts
        outcome = readings["outcome"]
        failures.extend(outcome["failures"])
        for name, kind, message in outcome["errors"]:
            if kind not in ALLOWED_READ_KINDS:
                failures.append("%s raised %s %r" % (name, kind, message))
            if kind == "Corrupt":
                facts["read_corrupt"] = True
        failures.extend(check_readings(original, readings, touched))
        facts["readings"] = readings
    started = time.monotonic()
    try:
        report = plasmite.diagnose_pool(path, "fuzz")
    except Exception as err:
        return failures + ["doctor raised %s: %s" % (type(err).__name__, err)], facts
    if time.monotonic() - started > OPERATION_SECONDS:
        failures.append("doctor took %.1f s" % (time.monotonic() - started))
    facts["doctor"] = report["status"]
    if facts["read_corrupt"] and report["status"] != "corrupt":
        failures.append("reading found corruption (%s) but doctor says %s: %s" % (
            facts["open"] or [error for error in readings["outcome"]["errors"]
                              if error[1] == "Corrupt"], report["status"], report))
    facts["untouched"] = (original.readings is not None and not size_changed
                          and not overlaps(original.relevant, touched))
    if facts["untouched"]:
        # Nothing a reader depends on changed: everything reads as before.
        if pool is None:
            failures.append("untouched pool failed to open")
        else:
            for key in ("gets", "cursor", "cursor_error", "info"):
                if readings[key] != original.readings[key]:
                    failures.append("%s differs although no relevant byte changed" % key)
            original_status = plasmite.diagnose_pool(original.path, "fuzz")["status"]
            if report["status"] != original_status:
                failures.append("doctor says %s, undamaged %s" % (report["status"],
                                                                 original_status))
    return failures, facts


def check_readings(original, readings, touched):
    """The oracle for what readers returned (see the module docstring)."""
    failures = []
    oldest, newest = readings["bounds"]

    def check_frame(where, seq, timestamp_ns, payload, message):
        if message is not None:
            problem = message_shape_problem(message)
            if problem:
                failures.append("%s: message shape: %s" % (where, problem))
            elif message["seq"] != seq:
                failures.append("%s: message seq %d != frame seq %d" % (where, message["seq"], seq))
        known = original.frames.get(seq)
        if known is not None and not overlaps([known[:2]], touched):
            if (timestamp_ns, payload) != known[2:]:
                failures.append("%s: untouched frame of seq %d reads differently" % (where, seq))

    for seq, entry in readings["gets"].items():
        if entry[0] == "frame":
            _tag, frame_seq, timestamp_ns, payload, message = entry
            if frame_seq != seq:
                failures.append("get %d returned seq %d" % (seq, frame_seq))
            check_frame("get %d" % seq, frame_seq, timestamp_ns, payload, message)
    previous = 0
    for seq, timestamp_ns, payload, message in readings["cursor"]:
        if seq <= previous:
            failures.append("cursor: seq %d after %d" % (seq, previous))
        if not oldest <= seq <= newest:
            failures.append("cursor: seq %d outside the header's bounds %d..%d"
                            % (seq, oldest, newest))
        previous = seq
        check_frame("cursor %d" % seq, seq, timestamp_ns, payload, message)
    return failures


# -- the worker (a child process, so that a hang can be detected and killed) ---------------

def variant_plan(seed, number, source_count):
    """Return (source number, Random) for variant ``number``: independent of the others."""
    generator = random.Random("%d/%d" % (seed, number))
    return generator.randrange(source_count), generator


def run_worker(seed, first, count, work_directory, sources):
    """Check variants first..first+count-1, printing one JSON line per variant."""
    originals = {}
    path = os.path.join(work_directory, "variant.plasmite")
    for number in range(first, first + count):
        source, generator = variant_plan(seed, number, len(sources))
        print(json.dumps({"start": number}), flush=True)
        if source not in originals:
            originals[source] = Original(sources[source])
        original = originals[source]
        data, touched, description = damage(generator, original)
        failures, facts = check_variant(original, data, touched, path)
        summary = {"done": number, "source": original.name, "damage": description,
                   "failures": failures, "open": facts["open"], "doctor": facts["doctor"],
                   "read_corrupt": facts["read_corrupt"], "untouched": facts.get("untouched")}
        readings = facts.get("readings")
        if readings is not None:
            summary["messages"] = len(readings["cursor"])
            summary["cursor_error"] = readings["cursor_error"]
        print(json.dumps(summary), flush=True)


WORKER = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_corruption_fuzz
test_corruption_fuzz.run_worker(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
                                json.loads(sys.argv[7]))
"""


def run_campaign(seed, count, work_directory, sources):
    """Run ``count`` variants in watched worker processes; return the per-variant summaries.

    A worker that prints nothing for STALL_SECONDS is killed and the variant it
    was on is reported as a hang; a worker that dies is reported with its
    stderr.  Either way the campaign goes on with the next variant.
    """
    summaries = []
    number = 0
    while number < count:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, TESTS, ROOT, str(seed), str(number), str(count - number),
             str(work_directory), json.dumps(sources)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        current = number
        buffer = b""
        try:
            while True:
                ready, _, _ = select.select([worker.stdout], [], [], STALL_SECONDS)
                if not ready:
                    worker.kill()
                    summaries.append({"done": current, "failures": [
                        "hang: no progress for %d s (seed %d, variant %d)"
                        % (STALL_SECONDS, seed, current)]})
                    number = current + 1
                    break
                chunk = os.read(worker.stdout.fileno(), 65536)
                if not chunk:
                    worker.wait(timeout=60)
                    if number < count:  # died before finishing
                        stderr = worker.stderr.read().decode(errors="replace")
                        summaries.append({"done": current, "failures": [
                            "worker died (rc %s) on variant %d: %s"
                            % (worker.returncode, current, stderr[-2000:])]})
                        number = current + 1
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    if "start" in record:
                        current = record["start"]
                    else:
                        summaries.append(record)
                        number = record["done"] + 1
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            worker.stdout.close()
            worker.stderr.close()
    return summaries


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(str(tmp_path_factory.mktemp("sources")))


def describe_failures(summaries, seed):
    lines = []
    for summary in summaries:
        for failure in summary["failures"]:
            lines.append("seed %d variant %d (%s: %s): %s" % (
                seed, summary["done"], summary.get("source"), summary.get("damage"), failure))
    return lines


@pytest.mark.campaign
def test_corruption_campaign(sources, tmp_path):
    started = time.monotonic()
    summaries = run_campaign(SEED, VARIANTS, tmp_path, sources)
    failures = describe_failures(summaries, SEED)
    opened = sum(1 for summary in summaries if summary.get("open") is None)
    corrupt_reads = sum(1 for summary in summaries if summary.get("read_corrupt"))
    print("corruption campaign: seed %d, %d variants over %d pools in %.1f s: %d opened, "
          "%d read as corrupt, %d doctor-corrupt, %d with no relevant byte touched, %d failures"
          % (SEED, len(summaries), len(sources), time.monotonic() - started, opened,
             corrupt_reads, sum(1 for summary in summaries if summary.get("doctor") == "corrupt"),
             sum(1 for summary in summaries if summary.get("untouched")), len(failures)))
    assert len(summaries) == VARIANTS
    assert not failures, "\n".join(failures[:30])


# -- the same variants through the real command line ---------------------------------------

def stderr_problems(result, allowed_exit_codes):
    """Check a finished pls run: exit code, no traceback, a JSON error envelope on failure."""
    problems = []
    stderr = result.stderr.decode(errors="replace")
    if "Traceback" in stderr:
        problems.append("traceback on stderr")
    if result.returncode not in allowed_exit_codes:
        problems.append("exit code %d, expected one of %s" % (result.returncode,
                                                             sorted(allowed_exit_codes)))
    # JSON lines end at "\n" only (str.splitlines would also split at U+2028, U+0085, ...).
    lines = [line for line in stderr.split("\n") if line]
    for line in lines:
        try:
            envelope = json.loads(line)
        except ValueError:
            problems.append("stderr line is not JSON: %r" % line[:200])
            continue
        if "error" in envelope:
            error = envelope["error"]
            if error["kind"] == "Internal" or plasmite.EXIT_CODES[error["kind"]] != result.returncode:
                problems.append("error kind %s with exit code %d" % (error["kind"], result.returncode))
            if not error.get("message"):
                problems.append("error without a message")
        elif "notice" not in envelope:
            problems.append("stderr line is neither error nor notice: %r" % line[:200])
    has_error = any('"error"' in line for line in lines)
    if result.returncode not in (0, plasmite.EXIT_TIMEOUT) and not has_error:
        if not (result.returncode == 7 and result.stdout.startswith(b'{"reports"')):
            problems.append("exit code %d without an error envelope" % result.returncode)
    return problems


def without_ages(info):
    for label in ("oldest", "newest"):
        info["metrics"]["age"].pop(label + "_age_ms")
    info.pop("name", None)
    info.pop("path", None)
    return info


def check_cli_variant(pls, original, data, touched, path):
    """Run pool info, get, peek --tail and doctor on one damaged file; compare with in-process."""
    failures, facts = check_variant(original, data, touched, path)
    readings = facts.get("readings")
    open_code = plasmite.EXIT_CODES[facts["open"]] if facts["open"] else None
    name = os.path.basename(path)[:-len(".plasmite")]

    info = pls.run("pool", "info", name, "--json")
    failures += ["pool info: " + problem for problem in stderr_problems(info, {0, 2, 7})]
    if open_code is not None:
        if info.returncode != open_code:
            failures.append("pool info exit %d, open raised %s" % (info.returncode, facts["open"]))
    elif info.returncode != 0:
        failures.append("pool info exit %d on a pool that opens" % info.returncode)
    else:
        fields = without_ages(json.loads(info.stdout))
        expected = without_ages(json.loads(readings["info"]))
        if fields != expected:
            failures.append("pool info differs from LocalPool.info: %r != %r" % (fields, expected))

    for seq in sorted(readings["gets"]) if readings else (1,):
        result = pls.run("get", name, seq)
        failures += ["get %d: %s" % (seq, problem) for problem in stderr_problems(result, {0, 2, 3, 7})]
        if readings is None:
            expected_code, expected_stdout = open_code, b""
        else:
            entry = readings["gets"][seq]
            if entry[0] == "error":
                expected_code, expected_stdout = plasmite.EXIT_CODES[entry[1]], b""
            elif entry[4] is None:  # the frame did not decode
                expected_code, expected_stdout = 7, b""
            else:
                expected_code = 0
                expected_stdout = (plasmite.dump_json(entry[4]) + "\n").encode()
        if (result.returncode, result.stdout) != (expected_code, expected_stdout):
            failures.append("get %d: exit %d stdout %r, in-process %d %r" % (
                seq, result.returncode, result.stdout[:300], expected_code, expected_stdout[:300]))

    peek = pls.run("peek", name, "--tail", "100000", "--jsonl", "--timeout", "100ms")
    failures += ["peek: " + problem for problem in stderr_problems(peek, {2, 7, 124})]
    is_damaged = False
    if readings is None:
        expected_code, expected_stdout = open_code, b""
    else:
        # Without filters peek prints the tail as it reads it: the messages before the
        # damage, then the Corrupt error (exit 7). It starts at newest - N + 1, so when
        # the damage is in the header's seqs it may start after the oldest: then its
        # lines are a run of the in-process ones, not necessarily from the first.
        is_damaged = readings["cursor_error"] or (readings["cursor"] and readings["cursor"][-1][3] is None)
        expected_code = 7 if is_damaged else plasmite.EXIT_TIMEOUT
        expected_stdout = "".join(plasmite.dump_json(message) + "\n"
                                  for _seq, _timestamp, _payload, message in readings["cursor"]
                                  if message is not None)
        expected_stdout = expected_stdout.encode()
    if is_damaged and peek.returncode == 7 and (
            not peek.stdout or ("\n" + expected_stdout.decode()).find("\n" + peek.stdout.decode()) >= 0):
        pass    # a run of the readable messages, then the error
    elif (peek.returncode, peek.stdout) != (expected_code, expected_stdout):
        failures.append("peek: exit %d, %d stdout lines; in-process %d, %d lines" % (
            peek.returncode, peek.stdout.count(b"\n"), expected_code, expected_stdout.count(b"\n")))

    doctor = pls.run("doctor", name)
    failures += ["doctor: " + problem for problem in stderr_problems(doctor, {0, 7})]
    expected_code = 7 if facts["doctor"] == "corrupt" else 0
    if doctor.returncode != expected_code:
        failures.append("doctor exit %d, diagnose_pool said %s" % (doctor.returncode, facts["doctor"]))
    else:
        status = json.loads(doctor.stdout)["reports"][0]["status"]
        if status != facts["doctor"]:
            failures.append("doctor status %s, diagnose_pool %s" % (status, facts["doctor"]))
    return failures


@pytest.mark.campaign
def test_corruption_cli(sources, pls):
    os.makedirs(pls.directory)
    path = os.path.join(pls.directory, "variant.plasmite")
    originals = {}
    failures = []
    started = time.monotonic()
    for number in range(CLI_VARIANTS):
        source, generator = variant_plan(SEED, number, len(sources))
        if source not in originals:
            originals[source] = Original(sources[source])
        original = originals[source]
        data, touched, description = damage(generator, original)
        failures += ["seed %d variant %d (%s: %s): %s" % (SEED, number, original.name, description,
                                                         failure)
                     for failure in check_cli_variant(pls, original, data, touched, path)]
    print("corruption CLI: seed %d, %d variants in %.1f s, %d failures"
          % (SEED, CLI_VARIANTS, time.monotonic() - started, len(failures)))
    assert not failures, "\n".join(failures[:30])


# -- regressions found by the campaign ---------------------------------------------------------

def test_flipped_seq_field_is_not_taken_for_another_message(fixture_pool):
    """One flipped bit turned frame 2's seq into 10; without an index, get 10 returned message 2."""
    path = fixture_pool("noindex_64k")
    with plasmite.LocalPool.open(path) as pool:
        second = pool.inspect_frame(0).next_offset
        seq_field = pool.ring_offset + second + 16
        assert pool.index_capacity == 0 and pool.bounds() == (1, 10)
    with open(path, "r+b") as handle:
        handle.seek(seq_field)
        assert handle.read(8) == struct.pack("<Q", 2)
        handle.seek(seq_field)
        handle.write(struct.pack("<Q", 2 ^ 8))
    with plasmite.LocalPool.open(path) as pool:
        assert plasmite.message_fields(pool.get(1))["seq"] == 1
        for seq in (2, 9, 10):
            with pytest.raises(PlasmiteError) as caught:
                pool.get(seq)
            assert caught.value.kind == "Corrupt" and caught.value.offset == second
        cursor = pool.cursor(1)
        assert cursor.next_frame().seq == 1
        with pytest.raises(PlasmiteError) as caught:
            cursor.next_frame()
        assert caught.value.kind == "Corrupt"
    assert plasmite.diagnose_pool(path, "noindex")["status"] == "corrupt"
