"""Cross-process behaviour: concurrent writers, followers, the file lock.

Killed writers and the long soak are the campaigns in test_campaigns.py.
"""

import json
import os
import subprocess
import sys
import time

import plasmite
from conftest import ROOT

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import plasmite
with plasmite.Client(sys.argv[2]) as client:
    pool = client.open_pool("shared")
    writer = int(sys.argv[3])
    for number in range(int(sys.argv[4])):
        pool.append_json(b'{"w": %d, "i": %d}' % (writer, number), ["w%d" % writer])
"""

FOLLOWER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import plasmite
with plasmite.Client(sys.argv[2]) as client:
    pool = client.open_pool("shared")
    total = int(sys.argv[3])
    seen = []
    print("ready", flush=True)
    with pool.open_stream(since_seq=1, timeout_ms=20000) as stream:
        while len(seen) < total:
            raw = stream.next_json()
            if raw is None:
                break
            message = plasmite.parse_message(raw)
            seen.append([message["seq"], message["data"]["w"], message["data"]["i"]])
        print(json.dumps({"seen": seen, "dropped": stream.dropped_count}), flush=True)
"""


def test_four_writers_two_followers(tmp_path):
    writers, per_writer = 4, 3000
    total = writers * per_writer
    with plasmite.Client(str(tmp_path)) as client:
        client.create_pool("shared", 16 * 1024 * 1024)
    followers = [subprocess.Popen([sys.executable, "-c", FOLLOWER, ROOT, str(tmp_path), str(total)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for follower in followers:
        assert follower.stdout.readline().strip() == "ready"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, ROOT, str(tmp_path), str(w),
                               str(per_writer)]) for w in range(writers)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    for follower in followers:
        out, _ = follower.communicate(timeout=60)
        result = json.loads(out.splitlines()[-1])
        assert result["dropped"] == 0
        assert [entry[0] for entry in result["seen"]] == list(range(1, total + 1))
        for writer in range(writers):
            numbers = [entry[2] for entry in result["seen"] if entry[1] == writer]
            assert numbers == list(range(per_writer))
    with plasmite.Client(str(tmp_path)) as client:
        pool = client.open_pool("shared")
        assert pool._local().bounds() == (1, total)
        issues, last_good, _ = plasmite.validate_pool(pool._local())
        assert issues == [] and last_good == total


HOLD_LOCK = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC: comparable across processes
fcntl.flock(fd, fcntl.LOCK_UN)
"""


def test_append_waits_for_another_process_holding_the_flock(tmp_path):
    path = str(tmp_path / "locked.plasmite")
    plasmite.LocalPool.create(path, 64 * 1024).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path, "0.3"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with plasmite.LocalPool.open(path) as pool:
        seq, _ = pool.append(plasmite.encode_message([], {"x": 1}))
        appended_at = time.monotonic()
    released_at = float(holder.stdout.readline())
    holder.wait(timeout=10)
    assert seq == 1
    assert appended_at >= released_at  # it blocked on the lock instead of racing the holder


def test_racing_creators_and_readers_never_see_a_half_made_pool(tmp_path):
    # Every process creates the pool or finds it made; a reader polling meanwhile may
    # find no file, but never a file that is not a whole pool (no "bad magic").
    for round_number in range(10):
        path = str(tmp_path / ("race%d.plasmite" % round_number))
        children = []
        for writer in range(6):
            child = os.fork()
            if child == 0:
                status = 1
                try:
                    try:
                        pool = plasmite.LocalPool.create(path, 32 * 1024 * 1024)
                    except plasmite.PlasmiteError as err:
                        assert err.kind == "AlreadyExists", err
                        pool = plasmite.LocalPool.open(path)
                    pool.append(plasmite.encode_message([], {"w": writer}))
                    status = 0
                finally:
                    os._exit(status)
            children.append(child)
        opened = 0
        while opened < 50:
            try:
                plasmite.LocalPool.open(path).close()
                opened += 1
            except plasmite.PlasmiteError as err:
                assert err.kind == "NotFound", (round_number, err.kind, err.message)
        assert [os.waitpid(child, 0)[1] for child in children] == [0] * 6
        with plasmite.LocalPool.open(path) as pool:
            assert pool.bounds() == (1, 6)
        assert os.listdir(str(tmp_path)).count(os.path.basename(path)) == 1
    assert not [name for name in os.listdir(str(tmp_path)) if name.endswith(".creating")]
