"""Benchmark of --where predicates (a script, not a test): prints numbers to record.

Usage: python3 tests/bench/bench_where.py [--evaluations N]

For a typical ~200-byte message it prints, per predicate: the compile time,
evaluations per second of the compiled predicate (compile_where, so the
--where decision is included) and the cost of one evaluation in microseconds.
For scale it also times json.loads of the same message, the decoding every
filtered message pays anyway.  Medians of 5 runs.
"""

import argparse
import json
import os
import statistics
import sys
import time

# -- import (the one line to change when this moves to tests/bench/) --------------
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import plasmite  # noqa: E402

MESSAGE_TEXT = ('{"seq": 42, "time": "2026-11-27T05:00:00.123456789Z", "meta": {"tags": ["orders", "error"]}, '
                '"data": {"id": 123, "kind": "order", "status": "green", "amount": 12.5, "user": "alice", '
                '"msg": "request timeout on host-7"}}')

# The four predicates named in the issue first, then other common shapes.
PREDICATES = [
    '.data.status == "green"',
    '.meta.tags[]? == "error"',
    '.data.msg | test("timeout")',
    '.data.kind == "order" and .data.amount > 10 and (.data.status == "green" or .data.user == "bob")',
    '.data.msg | test("TIMEOUT"; "i")',
    '.data.msg | contains("timeout")',
    'any(.meta.tags[]?; startswith("err"))',
    '.meta.tags | index("error") != null',
    '(.data.user | ascii_downcase) == "alice"',
    '.data | has("user")',
    '.time > "2026-11-27T04"',
    '.data.amount * 2 > 20',
    '(.data.missing // "none") == "none"',
    '[.meta.tags[]?] | length > 1',
    'select(.data.id == 123) | true',
    '.data.id as $id | $id % 2 == 1',
]


def median_rate(run, count, repeats=5):
    """Run ``run(count)`` several times; return the median operations per second."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(count)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def time_predicate(predicate, message, count):
    def run(repetitions):
        for _ in range(repetitions):
            predicate(message)
    return median_rate(run, count)


def time_compile(text, count=200):
    def run(repetitions):
        for _ in range(repetitions):
            plasmite.compile_where(text)
    return 1e6 / median_rate(run, count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=100000)
    count = parser.parse_args().evaluations
    message = json.loads(MESSAGE_TEXT)
    encoded = MESSAGE_TEXT.encode()

    def decode(repetitions):
        for _ in range(repetitions):
            json.loads(encoded)
    decode_rate = median_rate(decode, count)
    print("Python %s, message of %d bytes" % (sys.version.split()[0], len(encoded)))
    print("json.loads of the message: %9.0f /s  %6.2f us" % (decode_rate, 1e6 / decode_rate))
    print()
    print("%-92s %10s %12s %9s %8s" % ("predicate", "compile us", "evals/s", "us/eval", "result"))
    for text in PREDICATES:
        predicate = plasmite.compile_where(text)
        rate = time_predicate(predicate, message, count)
        print("%-92s %10.1f %12.0f %9.3f %8s" % (text, time_compile(text), rate, 1e6 / rate,
                                                 predicate(message)))


if __name__ == "__main__":
    main()
