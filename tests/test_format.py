"""Byte-level checks of the pool format: header layout, planning, wraps (spec/pool-format.md)."""

import hashlib
import os
import struct

import pytest

import plasmite
from plasmite import PlasmiteError


def test_record_sizes_match_the_spec():
    assert plasmite.POOL_HEADER.size == 104
    assert plasmite.FRAME_HEADER.size == 64
    assert plasmite.INDEX_SLOT.size == 16
    assert plasmite.RING_STATE.size == 40


@pytest.mark.parametrize("file_size, capacity", [
    (1024 * 1024, 4096), (64 * 1024, 256), (256 * 1024, 1024), (16 * 1024 * 1024, 65536),
    (64 * 1024 * 1024, 65536), (5120, 0), (5136, 1), (4100, 0), (8 * 1024, 32), (5000, 0),
])
def test_auto_index_capacity(file_size, capacity):
    assert plasmite.auto_index_capacity(file_size) == capacity


def test_fresh_pool_header_bytes(tmp_path):
    path = tmp_path / "a.plasmite"
    plasmite.LocalPool.create(path, 1024 * 1024).close()
    data = path.read_bytes()
    assert len(data) == 1024 * 1024
    assert data[:0x40] == bytes.fromhex(
        "504c534d030000000100000000000000" "00001000000000000010000000000000"
        "00100000000000000010010000000000" "00f00e00000000000000000000000000")
    assert data[0x40:] == bytes(len(data) - 0x40)


def test_one_append_matches_worked_example(tmp_path):
    """spec/pool-format.md 16.2: {"x":1}, no tags, ts 1700000000123456789."""
    path = tmp_path / "a.plasmite"
    with plasmite.LocalPool.create(path, 1024 * 1024) as pool:
        payload = plasmite.encode_message([], {"x": 1})
        assert len(payload) == 420
        assert pool.append(payload, 1700000000123456789) == (1, 1700000000123456789)
    data = path.read_bytes()
    assert data[0x40:0x68] == bytes.fromhex(
        "f001000000000000" "0000000000000000" "f001000000000000" "0100000000000000"
        "0100000000000000")
    assert data[0x1010:0x1020] == bytes.fromhex("01000000000000000000000000000000")
    assert data[0x11000:0x11040] == bytes.fromhex(
        "46524d31020000000000000040000000" "010000000000000015cd853dfe9c9717"
        "a40100005bfeffff0000000000000000" + "00" * 16)
    assert data[0x111e4:0x111ec] == b"PLSMCMIT"


def ring_state(path):
    with open(path, "rb") as handle:
        return struct.unpack_from("<QQQQQ", handle.read(104), 64)


def test_wrap_full_ring_and_eviction_table(tmp_path):
    """spec/pool-format.md 16.3: file 5120, no index, ring 1024, six appends."""
    path = str(tmp_path / "w.plasmite")
    expected = [(272, 0, 272, 1, 1), (544, 0, 272, 1, 2), (816, 0, 272, 1, 3),
                (272, 272, 544, 2, 4), (384, 544, 816, 3, 5), (496, 544, 816, 3, 6)]
    with plasmite.LocalPool.create(path, 5120, 0) as pool:
        assert pool.ring_size == 1024
        for size, state in zip([200, 200, 200, 200, 40, 40], expected):
            pool.append(bytes([size % 251]) * size, 1)
            assert ring_state(path) == state
    data = open(path, "rb").read()
    assert data[4096 + 816:4096 + 880] == bytes.fromhex(
        "46524d31030000000000000040000000" "0000000000000000" "0000000000000000"
        "00000000ffffffff00000000") + bytes(20)
    with plasmite.LocalPool.open(path) as pool:
        cursor = pool.cursor(1)
        seqs = []
        while True:
            frame = cursor.next_frame()
            if frame is None:
                break
            seqs.append((frame.seq, len(frame.payload)))
        assert seqs == [(3, 200), (4, 200), (5, 40), (6, 40)]
        assert cursor.dropped_count == 2


def test_implicit_wrap_is_read_as_a_wrap(tmp_path):
    """A frame ending fewer than 64 bytes before the ring end wraps without a marker."""
    path = str(tmp_path / "g.plasmite")
    with plasmite.LocalPool.create(path, 4096 + 1024, 0) as pool:
        # 3 frames of 328 bytes end at 984: 40 bytes left, too few for a marker.
        for number in range(3):
            pool.append(bytes([number + 1]) * 256, 10 + number)
        assert pool.append(b"\x09" * 256, 20) == (4, 20)
        head, tail, _tail_next, oldest, newest = pool.read_state()
        assert (head, oldest, newest) == (328, 2, 4)
        frames = []
        cursor = pool.cursor(1)
        for _ in range(10):
            frame = cursor.next_frame()
            if frame is None:
                break
            frames.append(frame.seq)
        assert frames == [2, 3, 4]
        assert pool.get(4).payload == b"\x09" * 256


@pytest.mark.parametrize("field_offset, value, kind, message", [
    (0, b"XLSM", "Corrupt", "bad magic"),
    (4, struct.pack("<I", 4), "Usage", "unsupported pool format version 4 (supported: 3)"),
    (8, b"\x02", "Corrupt", "unsupported endianness"),
    (16, struct.pack("<Q", 12345), "Corrupt", "invalid file size"),
    (24, struct.pack("<Q", 4097), "Corrupt", "invalid index offset"),
    (40, struct.pack("<Q", 12288), "Corrupt", "ring offset mismatch"),
    (48, struct.pack("<Q", 1), "Corrupt", "ring bounds mismatch"),
    (64, struct.pack("<Q", 1 << 40), "Corrupt", "header offset out of range"),
    (72, struct.pack("<Q", 4), "Corrupt", "header offset not aligned"),
    (88, struct.pack("<QQ", 5, 3), "Corrupt", "seq bounds inverted"),
    (64, struct.pack("<Q", 8), "Corrupt", "empty header offsets mismatch"),
])
def test_open_checks(tmp_path, field_offset, value, kind, message):
    path = tmp_path / "p.plasmite"
    plasmite.LocalPool.create(path, 64 * 1024).close()
    data = bytearray(path.read_bytes())
    data[field_offset:field_offset + len(value)] = value
    path.write_bytes(bytes(data))
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.open(path)
    assert caught.value.kind == kind
    assert caught.value.message == message
    assert caught.value.path == str(path)
    if kind == "Usage":
        assert "Upgrade plasmite" in caught.value.hint


def test_short_file_is_corrupt_and_missing_file_is_not_found(tmp_path):
    short = tmp_path / "short.plasmite"
    short.write_bytes(b"NOPE")
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.open(short)
    assert caught.value.kind == "Corrupt" and caught.value.causes == ["failed to fill whole buffer"]
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.open(tmp_path / "missing.plasmite")
    assert caught.value.kind == "NotFound"
    assert caught.value.causes == ["No such file or directory (os error 2)"]


def test_create_never_truncates_and_validates_first(tmp_path):
    path = tmp_path / "sub" / "dir" / "p.plasmite"
    with plasmite.LocalPool.create(path, 64 * 1024) as pool:
        pool.append(b"x" * 10, 5)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.create(path, 64 * 1024)
    assert caught.value.kind == "AlreadyExists" and caught.value.hint
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.create(tmp_path / "tiny.plasmite", 4096, 0)
    assert caught.value.kind == "Usage"
    assert caught.value.message == "file_size must exceed header and index size"
    assert not (tmp_path / "tiny.plasmite").exists()


def test_oversize_payload_is_rejected_and_pool_untouched(tmp_path):
    path = tmp_path / "p.plasmite"
    with plasmite.LocalPool.create(path, 64 * 1024) as pool:
        pool.append(b"a" * 100, 1)
        before = path.read_bytes()
        with pytest.raises(PlasmiteError) as caught:
            pool.append(b"b" * pool.ring_size, 2)
        assert caught.value.kind == "Usage" and caught.value.message == "payload exceeds ring capacity"
        assert caught.value.hint
        largest = pool.max_payload_length
        assert pool.append(b"c" * largest, 3)[0] == 2
        assert pool.get(2).payload == b"c" * largest
    assert path.read_bytes() != before


def test_flush_durability_appends(tmp_path):
    with plasmite.LocalPool.create(tmp_path / "f.plasmite", 64 * 1024, 0) as pool:
        for number in range(300):
            pool.append(b"p" * (number % 97 + 1), number, should_flush=True)
        assert pool.bounds()[1] == 300
        assert pool.get(300).payload == b"p" * (299 % 97 + 1)


def test_random_append_sequences_stay_readable(tmp_path):
    """Many sizes, wraps and capacities: every live seq is readable and in order."""
    import random
    generator = random.Random(7)
    for trial in range(30):
        capacity = generator.choice([0, 1, 3, 16, None])
        size = generator.choice([5120, 6000, 9000, 20000]) + generator.randrange(0, 64)
        path = str(tmp_path / ("r%d.plasmite" % trial))
        with plasmite.LocalPool.create(path, size, capacity) as pool:
            limit = (pool.ring_size & ~7) - 72  # largest frame that still fits
            for number in range(generator.randrange(1, 120)):
                length = generator.choice([1, 8, 50, 200, generator.randrange(1, limit + 1)])
                pool.append(number.to_bytes(4, "little") * (length // 4) + b"z" * (length % 4), number)
            oldest, newest = pool.bounds()
            cursor = pool.cursor(1)
            seen = []
            while True:
                frame = cursor.next_frame()
                if frame is None:
                    break
                seen.append(frame.seq)
                assert frame.payload[:4] == (frame.seq - 1).to_bytes(4, "little") or len(frame.payload) < 4
                assert pool.get(frame.seq) == frame
            assert seen == list(range(oldest, newest + 1))
            assert cursor.dropped_count == oldest - 1


def test_bad_files_give_errors_with_hints(tmp_path):
    """Not a pool, a truncated pool, a newer format: the right kind, a hint, nothing written."""
    not_pool = tmp_path / "random.plasmite"
    not_pool.write_bytes(os.urandom(8192))
    truncated = tmp_path / "truncated.plasmite"
    plasmite.LocalPool.create(truncated, 64 * 1024).close()
    with open(truncated, "r+b") as handle:
        handle.truncate(10000)
    newer = tmp_path / "newer.plasmite"
    plasmite.LocalPool.create(newer, 64 * 1024).close()
    data = bytearray(newer.read_bytes())
    data[4:8] = struct.pack("<I", 4)
    newer.write_bytes(bytes(data))
    cases = [(not_pool, "Corrupt", "bad magic"), (truncated, "Corrupt", "invalid file size"),
             (newer, "Usage", "unsupported pool format version 4 (supported: 3)"),
             (tmp_path / "missing.plasmite", "NotFound", "not found")]
    for path, kind, message in cases:
        before = path.read_bytes() if path.exists() else None
        with pytest.raises(PlasmiteError) as caught:
            plasmite.LocalPool.open(path)
        assert (caught.value.kind, caught.value.message) == (kind, message)
        assert caught.value.hint and caught.value.path == str(path)
        assert (path.read_bytes() if path.exists() else None) == before


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    import subprocess
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: %s" % result.stderr.decode().strip())
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_is_reported_at_create_and_appends_cannot_hit_it(small_filesystem):
    too_big = small_filesystem / "big.plasmite"
    with pytest.raises(PlasmiteError) as caught:
        plasmite.LocalPool.create(too_big, 4 * 1024 * 1024)
    assert caught.value.kind == "Io" and caught.value.message == "not enough disk space for the pool"
    assert caught.value.hint and not too_big.exists()
    path = small_filesystem / "p.plasmite"
    with plasmite.LocalPool.create(path, 1024 * 1024) as pool:
        # Fill the rest of the filesystem; the pool's blocks are already reserved,
        # so appends through the mapping still succeed (a sparse pool would SIGBUS).
        with open(small_filesystem / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(bytes(64 * 1024))
                    filler.flush()
            except OSError:
                pass
        payload = plasmite.encode_message(["fill"], {"pad": "x" * 900})
        for _ in range(3000):  # about 3 MB: wraps the 1 MiB ring several times
            pool.append(payload)
        oldest, newest = pool.bounds()
        assert newest == 3000 and plasmite.validate_pool(pool)[0] == []
