"""Benchmark of the storage core (a script, not a test): prints numbers to record.

Usage: python3 tests/bench/bench_core.py [--messages N]

Measures, for a ~120-byte JSON message with one tag: in-process append
messages/s through the API (append_json) and through the storage layer with a
pre-encoded payload, read-back messages/s, get(seq) microseconds, Lite3
encode/decode microseconds, and, in the same run, a sqlite3 message log (WAL,
synchronous=NORMAL, one INSERT per message) for comparison.  Medians of 5.
"""

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import plasmite  # noqa: E402

MESSAGE = (b'{"id": 123456, "kind": "order", "status": "green", "amount": 12.5, '
           b'"user": "alice", "msg": "request timeout on host-7"}')
TAGS = ["orders"]


def median_rate(run, count, repeats=5):
    """Run ``run(count)`` several times; return the median operations per second."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(count)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def median_micros(run, count, repeats=5):
    return 1e6 / median_rate(run, count, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    count = parser.parse_args().messages
    with tempfile.TemporaryDirectory(prefix="plasmite-bench-") as directory:
        measure(directory, count)


def measure(directory, count):
    client = plasmite.Client(directory)
    pool = client.create_pool("bench", 64 * 1024 * 1024)
    local = pool._local()
    data = plasmite.parse_json_value(MESSAGE)
    payload = plasmite.encode_message(TAGS, data)

    def append_api(n):
        for _ in range(n):
            pool.append_json(MESSAGE, TAGS)

    def append_storage(n):
        encode = plasmite.encode_message
        for _ in range(n):
            local.append(encode(TAGS, data))

    rows = []
    rows.append(("append_json (API), msg/s", median_rate(append_api, count)))
    rows.append(("parse+encode+append (no receipt), msg/s", median_rate(
        lambda n: [local.append(plasmite.encode_message(TAGS, plasmite.parse_json_value(MESSAGE)))
                   for _ in range(n)], count)))
    rows.append(("encode+append (storage), msg/s", median_rate(append_storage, count)))
    oldest, newest = local.bounds()

    def read_frames(n):
        cursor = local.cursor(newest - n + 1)
        for _ in range(n):
            cursor.next_frame()

    def read_messages(n):
        cursor = local.cursor(newest - n + 1)
        for _ in range(n):
            plasmite.message_fields(cursor.next_frame())

    def read_json(n):
        with pool.open_stream(since_seq=newest - n + 1, max_messages=n, timeout_ms=0) as stream:
            for _ in range(n):
                stream.next_json()

    rows.append(("read frames (cursor, no decode), msg/s", median_rate(read_frames, count)))
    rows.append(("read + decode messages, msg/s", median_rate(read_messages, count)))
    rows.append(("read as JSON bytes (Stream.next_json), msg/s", median_rate(read_json, count)))
    rows.append(("get(seq), us", median_micros(
        lambda n: [local.get(newest - i) for i in range(n)], count)))
    rows.append(("Lite3 encode_message, us", median_micros(
        lambda n: [plasmite.encode_message(TAGS, data) for _ in range(n)], count)))
    rows.append(("Lite3 decode_message, us", median_micros(
        lambda n: [plasmite.decode_message(payload) for _ in range(n)], count)))
    rows.append(("JSON parse (serde rules), us", median_micros(
        lambda n: [plasmite.parse_json_value(MESSAGE) for _ in range(n)], count)))

    database = sqlite3.connect(os.path.join(directory, "log.sqlite3"), isolation_level=None)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=NORMAL")
    database.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY, time INTEGER, tags TEXT, data TEXT)")
    tags_text = json.dumps(TAGS)
    text = MESSAGE.decode()

    def append_sqlite(n):
        for _ in range(n):
            database.execute("INSERT INTO log (time, tags, data) VALUES (?, ?, ?)",
                             (time.time_ns(), tags_text, text))

    sqlite_rate = median_rate(append_sqlite, count)
    rows.append(("sqlite3 WAL INSERT (same run), msg/s", sqlite_rate))
    rows.append(("append_json / sqlite3 ratio", rows[0][1] / sqlite_rate))
    print("python %s, %d messages per repetition, payload %d bytes (JSON %d bytes)"
          % (sys.version.split()[0], count, len(payload), len(MESSAGE)))
    for label, value in rows:
        print("%-48s %12.2f" % (label, value))
    database.close()
    client.close()


if __name__ == "__main__":
    main()
