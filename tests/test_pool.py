"""Reading and writing upstream's own pool files (fixtures made by plasmite 0.1.0)."""

import hashlib
import json
import os
import random
import shutil
import time

import pytest

import plasmite
from conftest import POOL_FIXTURES, load_expected, pool_fixture_names
from plasmite import PlasmiteError

# Fixtures whose history starts at seq 1 and is undamaged: rewriting their
# messages with the same timestamps must reproduce the file byte for byte.
REBUILDABLE = ["base3_clean_64k", "edge_payloads_256k", "empty_1m", "five_tagged_1m",
               "noindex_64k"]


def read_all(pool, start=1, limit=100000):
    """Read every message from ``start`` with a cursor; return the message dicts."""
    cursor = pool.cursor(start)
    messages = []
    for _ in range(limit):
        frame = cursor.next_frame()
        if frame is None:
            return messages
        messages.append(plasmite.message_fields(frame))
    raise AssertionError("cursor did not stop")


def expected_messages(expected):
    return expected.get("messages_expected_correct_reader", expected["messages"])


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_messages(name, fixture_pool):
    expected = load_expected(name)
    started = time.monotonic()
    if expected["messages_rc"] == 7 and expected["info_rc"] == 7:
        with pytest.raises(PlasmiteError) as caught:
            plasmite.LocalPool.open(fixture_pool(name))
        assert caught.value.kind == "Corrupt"
        assert caught.value.message == json.loads(expected["messages_stderr"])["error"]["message"]
        return
    with plasmite.LocalPool.open(fixture_pool(name)) as pool:
        if expected["messages_rc"] == 124 or "messages_expected_correct_reader" in expected:
            messages = read_all(pool)
            assert messages == expected_messages(expected)
            if expected["messages_rc"] == 124:
                lines = [plasmite.dump_json(message) for message in messages]
                assert lines == expected["messages_jsonl_raw"]
        else:
            # Upstream hung or failed on a damaged frame: we must say Corrupt.
            with pytest.raises(PlasmiteError) as caught:
                read_all(pool)
            assert caught.value.kind == "Corrupt"
            assert caught.value.seq in (2, 3)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_get(name, fixture_pool):
    expected = load_expected(name)
    try:
        pool = plasmite.LocalPool.open(fixture_pool(name))
    except PlasmiteError as err:
        assert all(entry["rc"] == err.exit_code for entry in expected["get"])
        return
    with pool:
        for entry in expected["get"]:
            if entry["rc"] == 0:
                frame = pool.get(entry["seq"])
                assert plasmite.dump_json(plasmite.message_fields(frame)) + "\n" == entry["stdout"]
            elif entry["rc"] == 3:
                with pytest.raises(PlasmiteError) as caught:
                    pool.get(entry["seq"])
                assert caught.value.kind == "NotFound" and caught.value.seq == entry["seq"]
            else:  # upstream printed Corrupt or hung: a damaged frame
                with pytest.raises(PlasmiteError) as caught:
                    plasmite.message_fields(pool.get(entry["seq"]))
                assert caught.value.kind == "Corrupt"


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_info(name, fixture_pool):
    expected = load_expected(name)
    if expected["info_rc"] not in (0, "timeout(killed after 5s)"):
        return
    with plasmite.LocalPool.open(fixture_pool(name)) as pool:
        info = pool.info()
    if expected["info_rc"] == 0:
        wanted = dict(expected["info"])
    else:  # upstream hung here; compute what it should have said from the header
        header = expected["raw_pool_header"]
        wanted = {"bounds": {"oldest": header["oldest_seq"], "newest": header["newest_seq"]}}
        info = {"bounds": info["bounds"]}
    wanted.pop("name", None)
    wanted.pop("path", None)
    if "metrics" in wanted:
        for key in ("oldest_age_ms", "newest_age_ms"):
            assert (info["metrics"]["age"][key] is None) == (wanted["metrics"]["age"][key] is None)
            info["metrics"]["age"][key] = wanted["metrics"]["age"][key]
    assert info == wanted


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_doctor(name, fixture_pool):
    expected = load_expected(name)
    report = plasmite.diagnose_pool(fixture_pool(name), name)
    wanted = expected["doctor"]["reports"][0]
    report["path"] = wanted["path"]
    if name in ("corrupt_payload_64k", "missing_commit_marker_64k"):
        # Upstream's doctor misses these; ours must catch them.
        assert wanted["status"] == "ok"
        assert report["status"] == "corrupt"
        assert report["issues"][0]["seq"] in (2, 3)
        assert report["last_good_seq"] in (1, 2)
        return
    assert report == wanted


@pytest.mark.parametrize("name", REBUILDABLE)
def test_rewriting_fixture_messages_is_byte_identical(name, tmp_path):
    expected = load_expected(name)
    header = expected["raw_pool_header"]
    timestamps = {frame["seq"]: frame["timestamp_ns"] for frame in expected["raw_frames"]}
    client = plasmite.Client(str(tmp_path))
    with client:
        pool = client.create_pool(name, header["file_size"], header["index_capacity"])
        if "poke_attempts" in expected:
            inputs = [attempt for attempt in expected["poke_attempts"] if attempt["rc"] == 0]
            by_seq = {message["seq"]: message for message in expected["messages"]}
            for seq, attempt in enumerate(inputs, 1):
                text = attempt["input"]
                if text.startswith("<"):  # the 20 KB blob is recorded only in messages
                    text = json.dumps(by_seq[seq]["data"])
                tags = ["edge", attempt["case"]]
                raw = pool.append_json(text.encode(), tags, plasmite.Durability.FAST,
                                       timestamp_ns=timestamps[seq])
                assert raw.decode() + "\n" == attempt["poke_stdout"]
        else:
            for message in expected["messages"]:
                pool.append_json(json.dumps(message["data"]), message["meta"]["tags"],
                                 timestamp_ns=timestamps[message["seq"]])
    digest = hashlib.sha256((tmp_path / (name + ".plasmite")).read_bytes()).hexdigest()
    assert digest == expected["file_sha256"]


def test_appending_to_wrapped_upstream_pools_keeps_them_valid(fixture_pool):
    """Our writer continues upstream's rings: planning, eviction and tail_next agree."""
    for name in ("wrapped_64k", "noindex_wrapped_64k", "noindex_wrapped_hang_64k"):
        path = fixture_pool(name)
        with plasmite.LocalPool.open(path) as pool:
            oldest, newest = pool.bounds()
            for number in range(400):
                payload = plasmite.encode_message(["more"], {"n": number, "pad": "p" * (number % 37)})
                assert pool.append(payload)[0] == newest + 1 + number
            issues, last_good, _warnings = plasmite.validate_pool(pool)
            assert issues == [] and last_good == newest + 400
            messages = read_all(pool)
            assert messages[-1]["data"] == {"n": 399, "pad": "p" * (399 % 37)}
            assert [m["seq"] for m in messages] == list(range(messages[0]["seq"], newest + 401))


def test_list_pools_reports_unreadable_entries(tmp_path, fixture_pool):
    for name in ("base3_clean_64k", "bad_magic_64k", "empty_1m"):
        os.replace(fixture_pool(name), tmp_path / (name + ".plasmite"))
    (tmp_path / "notes.txt").write_text("not a pool")
    entries = plasmite.list_pools(tmp_path)
    assert [entry["name"] for entry in entries] == ["bad_magic_64k", "base3_clean_64k", "empty_1m"]
    assert entries[0]["error"]["error"]["kind"] == "Corrupt"
    assert entries[0]["error"]["error"]["hint"] == plasmite.CORRUPT_HINT
    assert entries[1]["bounds"] == {"oldest": 1, "newest": 3}
    assert entries[1]["file_size"] == 65536 and entries[1]["mtime"].endswith("Z")
    assert entries[2]["bounds"] == {}
    assert plasmite.list_pools(tmp_path / "missing") == []


def test_delete_pool_file(tmp_path):
    path = str(tmp_path / "d.plasmite")
    plasmite.LocalPool.create(path, 64 * 1024).close()
    plasmite.delete_pool_file(path)
    assert not os.path.exists(path)
    with pytest.raises(PlasmiteError) as caught:
        plasmite.delete_pool_file(path)
    assert caught.value.kind == "NotFound" and caught.value.message == "pool not found"


def test_fixture_files_are_the_shared_originals():
    """The copies in tests/fixtures must stay byte-identical to what upstream made."""
    for name in pool_fixture_names():
        expected = load_expected(name)
        with open(os.path.join(POOL_FIXTURES, name + ".plasmite"), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == expected["file_sha256"]


# -- appends killed between their header stores (issue 6) ----------------------
# A SIGKILL can land between any two of an append's header stores; raising
# from store_field stops the append at the same point (the frame bytes before
# that store are written, none after), and the file is what a killed writer
# leaves.  The crash campaign (test_campaigns.py) kills real processes.

class KilledWriter(Exception):
    """Raised in place of a header store: the writer "dies" there."""


def append_killed_before_store(pool, payload, store_number=None) -> int:
    """Append ``payload``, dying just before header store ``store_number`` (0-based).

    With None the append completes.  Returns the number of stores made.
    """
    original = plasmite.store_field
    stores = []

    def store_or_die(mapping, offset, value):
        if len(stores) == store_number:
            raise KilledWriter()
        stores.append(offset)
        original(mapping, offset, value)

    plasmite.store_field = store_or_die
    try:
        pool.append(payload)
    except KilledWriter:
        pass
    finally:
        plasmite.store_field = original
    return len(stores)


def test_issue_6_eviction_killed_in_a_full_ring_keeps_the_survivors(tmp_path):
    payload = plasmite.encode_message([], {"x": "y" * 20})
    ring_size = 8 * plasmite.frame_length(len(payload))
    with plasmite.LocalPool.create(tmp_path / "full.plasmite",
                                   plasmite.ring_offset_for(0) + ring_size, 0) as pool:
        for _ in range(11):
            pool.append(payload)
        head, tail, _tail_next, oldest, newest = pool.read_state()
        assert head == tail and (oldest, newest) == (4, 11)  # exactly full
        # Evicting seq 4 stores tail_next, oldest, tail: die before tail.
        append_killed_before_store(pool, payload, 2)
        assert pool.read_state()[1] == tail and pool.bounds() == (5, 11)
        issues, last_good, warnings = plasmite.validate_pool(pool)
        assert (issues, last_good, warnings) == ([], 11, [plasmite.INTERRUPTED_APPEND_WARNING])
        assert [message["seq"] for message in read_all(pool, 5)] == list(range(5, 12))
        assert pool.append(payload)[0] == 12
        assert pool.bounds() == (5, 12)  # was (12, 12): the repair emptied the ring
        assert [message["seq"] for message in read_all(pool, 5)] == list(range(5, 13))


def test_issue_6_wrapping_append_into_an_emptied_ring_killed_while_publishing(tmp_path):
    small = plasmite.encode_message([], {"n": 1})
    ring_size = 4096
    # Longer than the space left at the end, so it wraps to 0 and empties the
    # ring, and longer than the old head, so it covers the wrap marker it
    # wrote there: readers and the repair cannot find it through the head.
    large = plasmite.encode_message([], {"pad": "x" * 3000})
    path = tmp_path / "wrap.plasmite"
    with plasmite.LocalPool.create(path, plasmite.ring_offset_for(0) + ring_size, 0) as pool:
        for _ in range(3):
            pool.append(small)
    pristine = path.read_bytes()
    with plasmite.LocalPool.open(path) as pool:
        stores = append_killed_before_store(pool, large)
        assert pool.bounds() == (4, 4) and pool.read_state()[1] == 0  # emptied, frame at 0
    for store_number in range(stores):
        path.write_bytes(pristine)
        with plasmite.LocalPool.open(path) as pool:
            append_killed_before_store(pool, large, store_number)
            published = pool.read_state()[4] == 4
            issues, _, _ = plasmite.validate_pool(pool)
            assert issues == [], (store_number, issues)
            assert pool.append(small)[0] == (5 if published else 4), store_number
            issues, _, warnings = plasmite.validate_pool(pool)
            assert issues == [] and plasmite.INTERRUPTED_APPEND_WARNING not in warnings
            if published:  # a message whose seq was published is not lost by the repair
                assert pool.bounds() == (4, 5), (store_number, pool.read_state())
                assert pool.get(4).payload == large


def test_issue_6_appends_killed_before_each_header_store(tmp_path):
    """Random rings, an append killed before each of its header stores, then one more append.

    After the kill the pool validates, every readable message is unchanged
    and contiguous, and none that the finished append would have kept is
    unreadable; the next append repairs the rest and evicts no more than it
    would have after the finished append.
    """
    generator = random.Random(6)
    path, copy = tmp_path / "base.plasmite", tmp_path / "killed.plasmite"

    def readable(pool):
        bounds = pool.bounds()
        cursor = pool.cursor(bounds[0] if bounds else 1)
        frames = iter(cursor.next_frame, None)
        return {frame.seq: frame.payload for frame in frames}

    for scenario in range(150):
        sizes = generator.choice([(10, 10), (0, 200), (0, 2000), (500, 500)])
        frame_count = generator.randint(3, 12)
        ring_size = frame_count * plasmite.frame_length(len(plasmite.encode_message(
            [], {"n": 0, "p": "x" * sizes[1]}))) + generator.choice([0, 8, 64, 200])
        payloads = [plasmite.encode_message([], {"n": number, "p": "x" * generator.randint(*sizes)})
                    for number in range(generator.randint(0, 40))]
        killed = plasmite.encode_message([], {"p": "x" * generator.choice(
            [generator.randint(*sizes), generator.randint(0, max(ring_size - 2200, 0))])})
        repair = plasmite.encode_message([], {"p": "x" * generator.randint(*sizes)})
        index_capacity = generator.choice([0, 4, None])
        if path.exists():
            path.unlink()
        with plasmite.LocalPool.create(path, plasmite.ring_offset_for(index_capacity or 0)
                                       + ring_size, index_capacity) as pool:
            if len(killed) > pool.max_payload_length or len(repair) > pool.max_payload_length:
                continue
            for payload in payloads:
                pool.append(payload)
            before = readable(pool)
        shutil.copyfile(path, copy)
        with plasmite.LocalPool.open(copy) as pool:
            stores = append_killed_before_store(pool, killed)
            finished = readable(pool)
            pool.append(repair)
            reference_oldest = pool.bounds()[0]
        kept = set(finished) - {max(finished)}
        for store_number in range(stores):
            shutil.copyfile(path, copy)
            with plasmite.LocalPool.open(copy) as pool:
                label = "scenario %d, killed before store %d of %d" % (scenario, store_number,
                                                                       stores)
                append_killed_before_store(pool, killed, store_number)
                label += ", header %r" % (pool.read_state(),)
                issues, _, _ = plasmite.validate_pool(pool)
                assert issues == [], (label, issues)
                seen = readable(pool)
                for seq, payload in seen.items():
                    assert payload == before.get(seq, finished.get(seq)), (label, seq)
                assert not seen or sorted(seen) == list(range(min(seen), max(seen) + 1)), label
                assert kept <= set(seen), (label, sorted(kept - set(seen)))
                seq, _ = pool.append(repair)
                issues, _, warnings = plasmite.validate_pool(pool)
                assert issues == [] and plasmite.INTERRUPTED_APPEND_WARNING not in warnings, label
                assert pool.get(seq).payload == repair, label
                assert pool.bounds()[0] <= reference_oldest, (label, pool.bounds())
