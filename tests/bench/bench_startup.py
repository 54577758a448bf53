"""Start-up benchmark (a script, not a test): wall time of one pls.pyz process.

Usage: python3 tests/bench/bench_startup.py [--runs N] [--python PATH]

Builds dist/pls.pyz if missing, then prints the median wall time of
``python3 -c pass``, ``pls.pyz version`` and ``pls.pyz poke POOL '{"a":1}'``
over N runs each, measured in the same run, and their ratios.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_seconds(command, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--python", default=sys.executable)
    options = parser.parse_args()
    pyz = os.path.join(ROOT, "dist", "pls.pyz")
    if not os.path.exists(pyz):
        subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py")], check=True)
    directory = tempfile.mkdtemp(prefix="plasmite-startup-")
    subprocess.run([options.python, pyz, "--dir", directory, "pool", "create", "bench"], check=True,
                   stdout=subprocess.DEVNULL)
    baseline = median_seconds([options.python, "-c", "pass"], options.runs)
    rows = [("python -c pass", baseline)]
    rows.append(("pls.pyz version", median_seconds([options.python, pyz, "version"], options.runs)))
    rows.append(("pls.pyz poke", median_seconds(
        [options.python, pyz, "--dir", directory, "poke", "bench", '{"a":1}'], options.runs)))
    print("%s, median of %d runs" % (options.python, options.runs))
    for label, seconds in rows:
        print("%-22s %7.1f ms  %5.2fx" % (label, seconds * 1000, seconds / baseline))


if __name__ == "__main__":
    main()
